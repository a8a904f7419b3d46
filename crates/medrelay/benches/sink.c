/* The baseline of the upload benchmark (benches/limits.rs): the least an HTTP server can do
 * with an upload. It accepts connections on a loopback port (printed on stdout), and for each
 * (a thread each) reads one request's head, then Content-Length bytes of body, write()s them
 * to a file in DIR, and answers 200. No parsing beyond Content-Length, no TLS, no keep-alive.
 * Built by scripts/bench: cc -O2 -pthread -o sink sink.c */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *dir;
static int counter;

static void *serve(void *arg) {
  int fd = (int)(long)arg;
  char buf[65536];
  size_t head = 0;
  char *end = NULL;
  while (!end && head < sizeof buf - 1) {
    ssize_t n = read(fd, buf + head, sizeof buf - 1 - head);
    if (n <= 0) { close(fd); return NULL; }
    head += (size_t)n;
    buf[head] = 0;
    end = strstr(buf, "\r\n\r\n");
  }
  if (!end) { close(fd); return NULL; }
  long long length = 0;
  for (char *line = buf; line < end; line = strstr(line, "\r\n") + 2) {
    if (strncasecmp(line, "Content-Length:", 15) == 0) length = atoll(line + 15);
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/upload-%d", dir, __sync_fetch_and_add(&counter, 1));
  int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  size_t body = head - (size_t)(end + 4 - buf);
  if (body > 0 && write(out, end + 4, body) < 0) { close(out); close(fd); return NULL; }
  long long left = length - (long long)body;
  while (left > 0) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    if (write(out, buf, (size_t)n) < 0) break;
    left -= n;
  }
  close(out);
  unlink(path);
  const char *ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
  if (write(fd, ok, strlen(ok)) < 0) {}
  close(fd);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: sink DIR\n"); return 2; }
  dir = argv[1];
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 128)) { perror("sink"); return 1; }
  socklen_t len = sizeof addr;
  getsockname(s, (struct sockaddr *)&addr, &len);
  printf("%d\n", ntohs(addr.sin_port));
  fflush(stdout);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    pthread_t t;
    pthread_create(&t, NULL, serve, (void *)(long)c);
    pthread_detach(t);
  }
}
