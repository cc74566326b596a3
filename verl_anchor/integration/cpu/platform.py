"""A "cpu" platform for verl's PlatformRegistry, and the process-group fix it needs.

verl 0.9.1 has no CPU platform: detection falls back to "nvidia" and the workers then ask for
NCCL and CUDA. `PlatformCPU` answers verl's device questions for the host CPU. It is selected
only by `VERL_PLATFORM=cpu` (it never claims to be available during auto-detection), so merely
importing it on a GPU cluster changes nothing. Importing this module registers the platform.

verl reports a fake logical "GPU" Ray resource on CPU (`ray_resource_name() == "GPU"`, paired
with `+ray_kwargs.ray_init.num_gpus=1`) because its resource-pool manager always requests GPUs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed

from verl_anchor.integration import verl_api
from verl_anchor.integration.verl_api import PlatformBase, PlatformRegistry

__all__ = ["PlatformCPU", "cpu_platform_active", "patch_init_process_group", "register_platform"]


def cpu_platform_active() -> bool:
    """True when verl is told to run on the CPU platform (`VERL_PLATFORM=cpu`)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def _host_memory() -> tuple[int, int]:
    """(available, total) host memory in bytes, standing in for device memory."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _none(*args: Any, **kwargs: Any) -> None:
    return None


class _CPUDeviceModule:
    """What verl calls on `get_torch_device()`: `torch.cpu` plus the CUDA-only calls it makes.

    Memory statistics are 0 and cache/IPC calls are no-ops: there is no device allocator.
    """

    memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = staticmethod(_zero)
    reset_peak_memory_stats = reset_max_memory_allocated = reset_max_memory_cached = staticmethod(_none)
    empty_cache = ipc_collect = set_per_process_memory_fraction = staticmethod(_none)
    set_device = staticmethod(_none)

    @staticmethod
    def memory_stats(*args: Any, **kwargs: Any) -> dict[str, int]:
        return {}

    @staticmethod
    def mem_get_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
        return _host_memory()

    @staticmethod
    def get_device_name(*args: Any, **kwargs: Any) -> str:
        return "CPU"

    @staticmethod
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name: str) -> Any:
        # is_available, device_count, current_device, synchronize, Stream, stream, Event, ...
        try:
            return getattr(torch.cpu, name)
        except AttributeError:
            raise AttributeError(f"verl_anchor's CPU device module has no {name!r}") from None


_DEVICE_MODULE = _CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """verl platform for a machine without accelerators: device "cpu", gloo collectives."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never win auto-detection: the CPU platform is opt-in through VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # verl uses this as `.to(device=get_device_id())`; an int would mean cuda:N.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _cpu_backend(backend: Any) -> Any:
    """Collapse verl's "cpu:gloo,cpu:gloo" (device "cpu" twice) into "gloo"."""
    if not isinstance(backend, str) or ":" not in backend:
        return backend
    pairs = {part.strip() for part in backend.split(",") if part.strip()}
    return "gloo" if pairs == {"cpu:gloo"} else backend


def patch_init_process_group() -> None:
    """Wrap `torch.distributed.init_process_group` so verl's backend string works on CPU.

    verl builds `f"cpu:gloo,{device}:{backend}"`, which torch rejects as a duplicate device
    when the device is "cpu". The wrapper rewrites only that string, and only while the CPU
    platform is active; otherwise it passes every call through untouched. Idempotent.
    """
    original: Callable[..., Any] = torch.distributed.init_process_group
    if getattr(original, "_verl_anchor_cpu", False):
        return

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if cpu_platform_active():
            if args:
                args = (_cpu_backend(args[0]), *args[1:])
            elif "backend" in kwargs:
                kwargs["backend"] = _cpu_backend(kwargs["backend"])
        return original(*args, **kwargs)

    init_process_group._verl_anchor_cpu = True  # type: ignore[attr-defined]
    torch.distributed.init_process_group = init_process_group


def patch_valuehead_loader() -> None:
    """Let verl's critic load on CPU: its value-model loader hard-codes `flash_attention_2`.

    `verl.utils.model.load_valuehead_model` builds `AutoModelForTokenClassification` with
    `attn_implementation="flash_attention_2"`, which CPU torch cannot run (and then falls back to
    `trl`, not installed). Under the CPU platform the same model is built with the implementation
    the critic's config asks for (`critic.model.override_config.attn_implementation`). Idempotent.
    """
    verl_api.patch("load_valuehead_model", _with_cpu_attention)


def _with_cpu_attention(original: Callable[..., Any]) -> Callable[..., Any]:
    def load_valuehead_model(local_path: str, torch_dtype: Any, model_config: Any, trust_remote_code: bool) -> Any:
        if not cpu_platform_active():
            return original(local_path, torch_dtype, model_config, trust_remote_code)
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            trust_remote_code=trust_remote_code,
            attn_implementation=getattr(model_config, "_attn_implementation", None) or "sdpa",
        )

    return load_valuehead_model


def register_platform() -> None:
    """Add `PlatformCPU` to verl's registry as "cpu" (idempotent; the registry logs repeats)."""
    if PlatformRegistry.get("cpu") is not PlatformCPU:
        PlatformRegistry.register(platform="cpu")(PlatformCPU)


# On import, so that listing this module in VERL_USE_EXTERNAL_MODULES registers the platform
# before verl's entry-point plugins or any other module can ask for it.
register_platform()
