"""`esr bench`: event throughput and overhead, side by side with a C floor
and a bcc peer. What a run covers is named here, for the command line."""

WORKLOADS = ("open", "exec", "connect", "mixed", "tty", "write")
RATES = (10_000, 50_000, 100_000, 200_000, 0)  # events/s; 0 is flat out
# none: no BPF at all. outside: esr records, but not the generator, and no
# session at all. beside: esr records a session of another process (someone
# logged in) while the generator runs outside it.
MODES = ("none", "outside", "beside", "esr", "floor", "bcc", "bcc-wk64")
# The modes whose generator no recorder records.
UNRECORDED = ("none", "outside", "beside")
