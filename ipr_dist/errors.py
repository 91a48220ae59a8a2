"""Errors a user can cause. The CLI prints them as one line and exits non-zero; tracebacks are for bugs."""


class UserError(Exception):
    """A problem with the user's input (config, path, ROM, game, request), stated in one sentence
    that names the thing and what to do about it."""


class ConfigError(UserError):
    """An invalid config file, key, value or `--set` override."""


class GameError(UserError):
    """An unknown game, a missing ROM, or a game that cannot be started."""


class StoreError(UserError):
    """A trajectory store path that does not exist or holds unreadable shards."""


class EnvironmentCrashed(RuntimeError):
    """Not a user error: the process behind an environment (emulator, browser) died, so it cannot
    continue. The env actor ends its process on it, and Ray restarts the actor with a fresh one."""
