"""Offsets of kernel struct fields, read from the running kernel's BTF.

The bcc peer may compile against headers of another kernel (the nearest
installed linux-headers-*): fine for bcc's helpers and uapi types, but not
for the layout of kernel structs. The few fields its programs read through
pointers are located here instead, and passed to the compiler as -D offsets.

Stdlib only, like the rest of the peer: it runs under Debian's /usr/bin/python3
(where bcc is), not in esr's venv.
"""

import struct

BTF_PATH = "/sys/kernel/btf/vmlinux"

_BTF_PTR, _BTF_ARRAY, _BTF_STRUCT, _BTF_UNION = 2, 3, 4, 5
_BTF_TYPEDEF, _BTF_VOLATILE, _BTF_CONST, _BTF_RESTRICT, _BTF_TYPE_TAG = 8, 9, 10, 11, 18
_BTF_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # fixed tail
_BTF_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # per member


def field_offsets(fields: dict, path: str = BTF_PATH) -> dict:
    """{macro: byte offset} of struct members in the kernel's BTF; members
    of anonymous structs and unions are found as the compiler would."""
    with open(path, "rb") as f:
        data = f.read()
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data, 0
    )
    if magic != 0xEB9F:
        raise ValueError(f"{path}: not BTF")
    strings = hdr_len + str_off

    def name(off):
        return data[strings + off : data.index(b"\0", strings + off)].decode()

    wanted = {s for s, _, _ in fields.values()}
    types = [None]  # id -> (kind, name_off, size_or_type, kind_flag, pos, vlen)
    by_name = {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, size = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        types.append((kind, name_off, size, info >> 31, pos + 12, vlen))
        if kind == _BTF_STRUCT and name_off and vlen:
            n = name(name_off)
            if n in wanted:
                by_name.setdefault(n, len(types) - 1)
        pos += 12 + _BTF_EXTRA.get(kind, 0) + _BTF_PER_VLEN.get(kind, 0) * vlen

    def resolve(tid):
        while types[tid][0] in (
            _BTF_TYPEDEF,
            _BTF_VOLATILE,
            _BTF_CONST,
            _BTF_RESTRICT,
            _BTF_TYPE_TAG,
        ):
            tid = types[tid][2]
        return tid

    def size_of(tid):
        tid = resolve(tid)
        kind, _, size, _, tpos, _ = types[tid]
        if kind == _BTF_PTR:
            return 8
        if kind == _BTF_ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", data, tpos)
            return size_of(elem) * nelems
        return size

    def find(tid, member):
        """(bit offset, size) of member in struct/union tid, or None."""
        _kind, _, _, kflag, mpos, vlen = types[tid]
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", data, mpos + 12 * i)
            bits = m_off & 0xFFFFFF if kflag else m_off
            bitfield = bool(kflag and m_off >> 24)
            if m_name and name(m_name) == member:
                if bitfield or bits % 8:
                    raise ValueError(f"{member} is a bit field")
                return bits, size_of(m_type)
            if not m_name:
                inner = resolve(m_type)
                if types[inner][0] in (_BTF_STRUCT, _BTF_UNION):
                    found = find(inner, member)
                    if found:
                        return bits + found[0], found[1]
        return None

    offsets = {}
    for macro, (struct_name, member, want_size) in fields.items():
        tid = by_name.get(struct_name)
        if tid is None:
            raise ValueError(f"struct {struct_name} not in {path}")
        found = find(tid, member)
        if found is None:
            raise ValueError(f"struct {struct_name} has no member {member}")
        bits, size = found
        if size != want_size:
            raise ValueError(f"{struct_name}.{member} is {size} bytes, expected {want_size}")
        offsets[macro] = bits // 8
    return offsets
