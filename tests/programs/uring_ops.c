/* Opens a file and connects to a loopback port through io_uring only, as a
 * program avoiding the syscalls a recorder watches would.
 *
 *   uring_ops PATH PORT [sqpoll]
 *
 * With sqpoll, the ring's own kernel thread submits the operations. Exits 0
 * once both completed, whatever their result. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int run(struct io_uring *ring)
{
	struct io_uring_cqe *cqe;
	int err, res;

	if ((err = io_uring_submit(ring)) < 0)
		return err;
	if ((err = io_uring_wait_cqe(ring, &cqe)) < 0)
		return err;
	res = cqe->res;
	io_uring_cqe_seen(ring, cqe);
	return res;
}

int main(int argc, char **argv)
{
	struct io_uring_params params = { 0 };
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct io_uring ring;
	int err, fd, sock;

	if (argc < 3) {
		fprintf(stderr, "usage: uring_ops PATH PORT [sqpoll]\n");
		return 2;
	}
	if (argc > 3 && !strcmp(argv[3], "sqpoll")) {
		params.flags = IORING_SETUP_SQPOLL;
		params.sq_thread_idle = 1000;
	}
	if ((err = io_uring_queue_init_params(8, &ring, &params)) < 0) {
		fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-err));
		return 1;
	}
	io_uring_prep_openat(io_uring_get_sqe(&ring), AT_FDCWD, argv[1], O_RDONLY, 0);
	fd = run(&ring);
	printf("openat %d\n", fd);

	sock = socket(AF_INET, SOCK_STREAM, 0);
	addr.sin_port = htons(atoi(argv[2]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	io_uring_prep_connect(io_uring_get_sqe(&ring), sock, (struct sockaddr *)&addr, sizeof(addr));
	printf("connect %d\n", run(&ring));
	io_uring_queue_exit(&ring);
	return 0;
}
