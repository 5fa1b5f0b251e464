"""Exceptions kvcached raises. Running out of memory is not one of them: allocation returns None."""


class KVCachedError(Exception):
    """Base class for every error kvcached raises on purpose."""


class ConfigError(KVCachedError, ValueError):
    """An environment variable or argument has a value kvcached cannot use."""


class NoCudaDriverError(KVCachedError):
    """The CUDA backend was asked for on a machine without a usable CUDA driver."""


class DriverError(KVCachedError):
    """A virtual-memory call of the driver or the OS failed; names the call and the error."""

    def __init__(self, message: str, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


class BlockError(KVCachedError, ValueError):
    """A block id passed in was never handed out, is already free, or is repeated."""


class ShutdownError(KVCachedError):
    """The manager was used after shutdown()."""


class RegistryError(KVCachedError):
    """A registry instance is unknown, foreign, alive where it must be dead, or its segment is unreadable."""
