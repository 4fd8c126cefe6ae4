/* LD_PRELOAD shim of the write-error tests: every write to a file whose path contains
   $CORSA_EIO_PATH fails with EIO, as on a failing disk or a lost network file system. Both the
   system calls (Python's own writes) and stdio's fwrite (GDAL writes through it) are covered. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static int failing(int fd) {
    const char *want = getenv("CORSA_EIO_PATH");
    char link[64], path[4096];
    if (!want || !*want || fd < 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64);
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd, iov, iovcnt);
}

size_t fwrite(const void *ptr, size_t size, size_t nmemb, FILE *stream) {
    REAL(fwrite);
    if (stream && failing(fileno(stream))) { errno = EIO; return 0; }
    return real(ptr, size, nmemb, stream);
}
