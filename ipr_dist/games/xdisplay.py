"""A private virtual X display for one desktop game: Xvfb, keyboard and pointer input through the
XTest extension (events go to the display itself, so no window focus is needed and envs on one
machine never see each other's input), frame capture with MIT-SHM (mss), and the game process with
its own session, paused and resumed as a whole process group.

Every process started here gets PR_SET_PDEATHSIG = SIGKILL: when the env's process dies (a crashed
or killed Ray actor), the kernel kills its Xvfb and its game, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from ipr_dist.errors import EnvironmentCrashed, GameError

_PR_SET_PDEATHSIG = 1
APT_PACKAGES = "xvfb"
CLOCK_SOURCE = Path(__file__).with_name("desktop") / "clock_shim.c"
CACHE = Path(os.environ.get("IPR_DESKTOP_CACHE", Path.home() / ".cache" / "ipr-dist" / "desktop"))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def clock_library(game_id: str) -> Path:
    """The virtual-clock library (clock_shim.c), built once per node and source version with the C compiler."""
    source = CLOCK_SOURCE.read_bytes()
    lib = CACHE / f"libiprclock-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if lib.is_file():
        return lib
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise GameError(f"game '{game_id}': frame-stepped play preloads a small clock library built from "
                        f"{CLOCK_SOURCE} and no C compiler (cc) is installed; install gcc (scripts/setup.sh does) "
                        "or set `clock: real` in the game's spec")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "libiprclock.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per node
        if not lib.is_file():
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(CLOCK_SOURCE), "-ldl"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise GameError(f"game '{game_id}': building the clock library failed ({done.stderr.strip()[:200]}); "
                                "set `clock: real` in the game's spec to play without it")
            os.replace(tmp, lib)
    return lib


class VirtualDisplay:
    """One Xvfb server on a free display number, with an XTest input connection and a capturer."""

    def __init__(self, size: tuple[int, int], game_id: str, start_timeout_s: float = 20.0):
        self.game_id = game_id
        if shutil.which("Xvfb") is None:
            raise GameError(f"game '{game_id}': desktop games need Xvfb, which is not installed; run scripts/setup.sh "
                            f"(it installs the Debian packages {APT_PACKAGES})")
        read_fd, write_fd = os.pipe()
        w, h = size
        self.proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{w}x{h}x24", "-nolisten", "tcp", "-noreset",
             "-nocursor"],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent)
        os.close(write_fd)
        try:
            number = self._read_display_number(read_fd, start_timeout_s)
        finally:
            os.close(read_fd)
        self.name = f":{number}"
        from Xlib import display as xdisplay

        self.conn = xdisplay.Display(self.name)
        if not self.conn.has_extension("XTEST"):
            self.close()
            raise GameError(f"game '{game_id}': the virtual display has no XTEST extension for input")
        self.root = self.conn.screen().root
        self._grabber = None

    def _read_display_number(self, fd: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0 or not select.select([fd], [], [], left)[0]:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines() if self.proc.poll() is not None else []
                self.close()
                raise GameError(f"game '{self.game_id}': cannot open a virtual display (Xvfb "
                                f"{'exited: ' + err[-1] if err else 'did not start in time'})")
            chunk = os.read(fd, 64)
            if not chunk:
                continue
            data += chunk
        return int(data.strip())

    # --- windows ---------------------------------------------------------------------------------
    def find_window(self, title: str | None, klass: str | None):
        """The first mapped window whose title or class contains the given text, with its root geometry."""
        from Xlib import X, error

        stack = [self.root]
        while stack:
            win = stack.pop()
            try:
                children = win.query_tree().children
                if win is not self.root:
                    attrs = win.get_attributes()
                    if attrs.map_state == X.IsViewable:
                        name = win.get_wm_name() or ""
                        cls = " ".join(win.get_wm_class() or ())
                        if (title is not None and title in str(name)) or (klass is not None and klass in cls):
                            geo = win.get_geometry()
                            pos = win.translate_coords(self.root, 0, 0)
                            if geo.width > 1 and geo.height > 1:
                                return win, (-pos.x, -pos.y, geo.width, geo.height)
            except error.XError:  # the window went away while we looked
                continue
            stack.extend(children)
        return None, None

    def focus(self, window) -> bool:
        """Give the window the keyboard (no window manager runs on the display to do it); True when the
        display reports it has it."""
        from Xlib import X, error

        try:
            window.set_input_focus(X.RevertToPointerRoot, X.CurrentTime)
            self.conn.sync()
            return self.conn.get_input_focus().focus == window
        except error.XError:  # not viewable yet, or gone: the caller tries again or notices when it captures
            return False

    # --- input -----------------------------------------------------------------------------------
    def keycode(self, keysym_name: str) -> int:
        from Xlib import XK

        sym = XK.string_to_keysym(keysym_name)
        code = self.conn.keysym_to_keycode(sym)
        if not sym or not code:
            raise GameError(f"game '{self.game_id}': the virtual display has no key for {keysym_name!r}")
        return code

    def key(self, code: int, down: bool) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        xtest.fake_input(self.conn, X.KeyPress if down else X.KeyRelease, code)

    def move(self, x: int, y: int) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        xtest.fake_input(self.conn, X.MotionNotify, x=int(x), y=int(y))

    def button(self, number: int, down: bool) -> None:
        from Xlib import X
        from Xlib.ext import xtest

        xtest.fake_input(self.conn, X.ButtonPress if down else X.ButtonRelease, number)

    def flush(self) -> None:
        self.conn.sync()

    # --- capture ---------------------------------------------------------------------------------
    def grab(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """RGB pixels of a root-window rectangle (x, y, width, height)."""
        if self._grabber is None:
            import mss

            self._grabber = mss.MSS(display=self.name)
        x, y, w, h = box
        shot = self._grabber.grab({"left": x, "top": y, "width": w, "height": h})
        bgra = np.frombuffer(shot.raw, np.uint8).reshape(h, w, 4)
        return bgra[..., 2::-1].copy()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        for close in (lambda: self._grabber and self._grabber.close(), lambda: self.conn.close()):
            try:
                close()
            except Exception:  # already gone
                pass
        self._grabber = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class GameProcess:
    """The game, in its own session (so pausing stops every process it started) with a private HOME and,
    with `virtual_clock`, the clock library preloaded: the time spent paused is hidden from the game."""

    def __init__(self, command: list[str], env: dict[str, str], home: Path, display: str, cwd: Path, game_id: str,
                 virtual_clock: bool = False):
        self.game_id = game_id
        self.paused_at: float | None = None
        self.paused_ns = 0
        self._clock: mmap.mmap | None = None
        full_env = {**os.environ, **env, "HOME": str(home), "DISPLAY": display, "SDL_AUDIODRIVER": env.get(
            "SDL_AUDIODRIVER", "dummy"), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache")}
        full_env.pop("WAYLAND_DISPLAY", None)
        if virtual_clock:
            lib = clock_library(game_id)
            clock_file = home.parent / "clock"
            clock_file.write_bytes(bytes(8))
            with open(clock_file, "r+b") as f:
                self._clock = mmap.mmap(f.fileno(), 8)
            preload = " ".join(p for p in (str(lib), full_env.get("LD_PRELOAD", "")) if p)
            full_env.update(LD_PRELOAD=preload, IPR_CLOCK_FILE=str(clock_file))
        self.log = (home.parent / "game.log").open("wb")
        try:
            self.proc = subprocess.Popen(command, env=full_env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        except OSError as exc:
            self.log.close()
            if self._clock is not None:
                self._clock.close()
            raise GameError(f"game '{game_id}': cannot start {command[0]} ({exc.strerror}); fix `command` in its spec") from None

    def last_output(self) -> str:
        try:
            lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the game's process has used so far; 0 once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def pause(self) -> None:
        """Stop the game's process group; returns once the game process has stopped. A signal only takes
        effect when its target next runs: on a busy machine a game went on for a moment after the
        signal was sent, drawing over the step's frame and reading the clock as it was being rewritten."""
        if self.paused_at is None:
            self._signal(signal.SIGSTOP)
            # WNOWAIT: the report stays for the game's own waiter (Popen.poll); an exit ends the wait too
            try:
                os.waitid(os.P_PID, self.proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # already reaped: it exited
                raise EnvironmentCrashed(f"game '{self.game_id}': the game process exited "
                                         f"(last output: {self.last_output() or 'none'})") from None
            self.paused_at = time.monotonic_ns()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused_ns += time.monotonic_ns() - self.paused_at
            if self._clock is not None:  # written while the game is stopped: it never reads half a value
                self._clock[:8] = self.paused_ns.to_bytes(8, "little", signed=True)
            self.paused_at = None
            self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            raise EnvironmentCrashed(f"game '{self.game_id}': the game process exited "
                                     f"(last output: {self.last_output() or 'none'})") from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        if self._clock is not None:
            self._clock.close()
            self._clock = None
