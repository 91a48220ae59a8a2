/* The game's clock for frame-stepped desktop play (ipr_dist/games/xdisplay.py builds and preloads it).
 *
 * The env pauses the game's process group between steps (SIGSTOP) and resumes it for one step's slice;
 * a game that measures frame time on the wall clock would see the agent's thinking time as game time.
 * This library, preloaded into the game, subtracts the total time spent paused, read from an 8-byte
 * counter in a file the env maps (IPR_CLOCK_FILE, nanoseconds, written only while the game is
 * stopped), from every clock the game reads, and moves absolute sleep deadlines forward by the same
 * amount so they last as long as the game asked. CPU-time clocks are left alone. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile const int64_t *paused_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *, void *);
static int (*real_clock_nanosleep)(clockid_t, int, const struct timespec *, struct timespec *);

__attribute__((constructor)) static void ipr_clock_init(void) {
  real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
  real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
  real_clock_nanosleep = dlsym(RTLD_NEXT, "clock_nanosleep");
  const char *path = getenv("IPR_CLOCK_FILE");
  if (!path) return;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  void *p = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p != MAP_FAILED) paused_ns = p;
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
  if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
  int r = real_clock_gettime(clk, ts);
  if (r == 0 && paused_ns && clk != CLOCK_PROCESS_CPUTIME_ID && clk != CLOCK_THREAD_CPUTIME_ID) {
    int64_t ns = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec - *paused_ns;
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
  }
  return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
  if (!real_gettimeofday) real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
  int r = real_gettimeofday(tv, tz);
  if (r == 0 && tv && paused_ns) {
    int64_t us = (int64_t)tv->tv_sec * 1000000LL + tv->tv_usec - *paused_ns / 1000;
    tv->tv_sec = us / 1000000LL;
    tv->tv_usec = us % 1000000LL;
  }
  return r;
}

time_t time(time_t *t) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (t) *t = ts.tv_sec;
  return ts.tv_sec;
}

/* A sleep until an absolute time of the game's clock ends at that time of the real clock plus the
   paused time, so it lasts as long as the game asked. */
int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req, struct timespec *rem) {
  if (!real_clock_nanosleep) real_clock_nanosleep = dlsym(RTLD_NEXT, "clock_nanosleep");
  if ((flags & TIMER_ABSTIME) && paused_ns && req) {
    int64_t ns = (int64_t)req->tv_sec * 1000000000LL + req->tv_nsec + *paused_ns;
    struct timespec real = {ns / 1000000000LL, ns % 1000000000LL};
    return real_clock_nanosleep(clk, flags, &real, rem);
  }
  return real_clock_nanosleep(clk, flags, req, rem);
}
