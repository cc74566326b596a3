"""Every verl (and transformers) internal that verl_anchor relies on, in one place, checked before it is used.

verl has no stable API for what a plugin like this touches: trainer and worker methods it overrides,
module functions it wraps, registries it adds to. Each `Pin` below names one such symbol, where
verl 0.9.1 (`TESTED_VERL`) has it, the leading parameters the plugin relies on, and what uses it.

- `check_installed(pipelines)` reads the installed sources (Python's `ast`; nothing is imported, so
  it costs milliseconds): `read_settings` runs it in the driver before Ray starts, so an upgraded
  verl that moved or renamed a symbol the chosen pipeline needs fails at start-up with one message
  naming the symbols, the installed and the tested verl, never at step 1;
- the live objects are taken from here (`from verl_anchor.integration.verl_api import TrainingWorker`,
  `resolve(key)`, `patch(key, wrap)`), imported on first use and checked the same way (a missing
  symbol is a `VerlApiError`, an ImportError, at the import of the module that needs it).

`tests/test_verl_api.py` checks every pin against the installed verl, live and from source, and that
no other module of verl_anchor imports verl internals itself.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TESTED_VERL = "0.9.1"
PIPELINES = ("all", "v1", "legacy", "cpu", "ulysses")


class VerlApiError(ImportError):
    """The installed verl (or transformers) lacks what verl_anchor relies on."""


@dataclasses.dataclass(frozen=True)
class Pin:
    module: str
    attribute: str  # dotted inside the module ("" for the module itself)
    used_by: str
    pipelines: tuple[str, ...] = ("all",)
    params: tuple[str, ...] | None = None  # leading parameter names the plugin passes or expects
    static: bool = True  # False: set at run time (an instance attribute), checked live only

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}" if self.attribute else self.module


def _pins() -> dict[str, Pin]:
    ppo, workers, rollout = "verl.trainer.ppo", "verl.workers", "verl.workers.rollout"
    return {
        # Start-up: the driver's checks, the estimator names, the base estimator's registry.
        "validate_config": Pin(
            "verl.utils.config",
            "validate_config",
            "wrapped: the anchor checks run in the driver",
            params=("config", "use_reference_policy", "use_critic"),
        ),
        "auto_set_device": Pin(
            "verl.utils.device",
            "auto_set_device",
            "wrapped: every entry point's first call (refuses fully-async)",
            params=("config",),
        ),
        "need_critic": Pin(f"{ppo}.utils", "need_critic", "the critic switch after a gae base", params=("config",)),
        "need_reference_policy": Pin(
            f"{ppo}.utils", "need_reference_policy", "compose.validate's config check", params=("config",)
        ),
        "register_adv_est": Pin(
            f"{ppo}.core_algos", "register_adv_est", "registers the anchor_* estimator names", params=("name_or_enum",)
        ),
        "ADV_ESTIMATOR_REGISTRY": Pin(f"{ppo}.core_algos", "ADV_ESTIMATOR_REGISTRY", "checks base estimator names"),
        "FSDPActorConfig": Pin("verl.workers.config", "FSDPActorConfig", "tells the FSDP actor from Megatron's"),
        "Role.ActorRollout": Pin(f"{ppo}.utils", "Role.ActorRollout", "the actor role that gets the anchor worker"),
        "Role.ActorRolloutRef": Pin(
            f"{ppo}.utils", "Role.ActorRolloutRef", "the actor role that gets the anchor worker"
        ),
        "Role.Actor": Pin(f"{ppo}.utils", "Role.Actor", "the actor role that gets the anchor worker"),
        "default_compute_score": Pin("verl.utils.reward_score", "default_compute_score", "the math reward's fallback"),
        # Workers: statistics inside the old-log-prob forward.
        "TrainingWorker": Pin(
            f"{workers}.engine_workers", "TrainingWorker", "the anchor actor's base class", pipelines=("v1", "legacy")
        ),
        "TrainingWorker.infer_batch": Pin(
            f"{workers}.engine_workers",
            "TrainingWorker.infer_batch",
            "runs the statistics pass",
            ("v1", "legacy"),
            params=("self", "data"),
        ),
        "ActorRolloutRefWorker": Pin(
            f"{workers}.engine_workers",
            "ActorRolloutRefWorker",
            "the hybrid worker the anchor worker extends",
            ("v1", "legacy"),
        ),
        "ActorRolloutRefWorker.actor_worker_cls": Pin(
            f"{workers}.engine_workers",
            "ActorRolloutRefWorker.actor_worker_cls",
            "the hook that makes its actor an anchor actor",
            ("v1", "legacy"),
        ),
        "ActorRolloutRefWorker.compute_log_prob": Pin(
            f"{workers}.engine_workers",
            "ActorRolloutRefWorker.compute_log_prob",
            "the old-log-prob RPC",
            ("v1", "legacy"),
            params=("self", "data"),
        ),
        "DetachActorWorker": Pin(
            "verl.experimental.separation.engine_workers", "DetachActorWorker", "separate_async's actor worker", ("v1",)
        ),
        "Dispatch": Pin(
            "verl.single_controller.base.decorator", "Dispatch", "the anchor_prepare RPC", ("v1", "legacy")
        ),
        "register": Pin(
            "verl.single_controller.base.decorator", "register", "the anchor_prepare RPC", ("v1", "legacy")
        ),
        "tensordict_utils": Pin(
            "verl.utils.tensordict_utils", "", "the options in the old-log-prob TensorDict", ("v1", "legacy")
        ),
        "tensordict_utils.get_non_tensor_data": Pin(
            "verl.utils.tensordict_utils",
            "get_non_tensor_data",
            "reads the options in the worker",
            ("v1", "legacy"),
            params=("data", "key", "default"),
        ),
        "tensordict_utils.assign_non_tensor": Pin(
            "verl.utils.tensordict_utils",
            "assign_non_tensor",
            "writes the options",
            ("v1", "legacy"),
            params=("tensor_dict",),
        ),
        # v1 trainer (TransferQueue).
        "get_trainer_cls": Pin(
            f"{ppo}.v1.trainer_base",
            "get_trainer_cls",
            "wrapped: every mode gets the anchor step",
            ("v1",),
            params=("name",),
        ),
        "v1.get_trainer_cls": Pin(f"{ppo}.v1", "get_trainer_cls", "main_ppo's TaskRunner looks it up here", ("v1",)),
        "TRAINER_REGISTRY": Pin(f"{ppo}.v1.trainer_base", "TRAINER_REGISTRY", "anchor variants by name", ("v1",)),
        "PPOTrainer._init_resource_pool_mgr": Pin(
            f"{ppo}.v1.trainer_base",
            "PPOTrainer._init_resource_pool_mgr",
            "swaps in the anchor worker",
            ("v1",),
            params=("self",),
        ),
        "PPOTrainer._setup": Pin(
            f"{ppo}.v1.trainer_base", "PPOTrainer._setup", "builds the capture at start-up", ("v1",), params=("self",)
        ),
        "PPOTrainer._compute_old_log_prob": Pin(
            f"{ppo}.v1.trainer_base",
            "PPOTrainer._compute_old_log_prob",
            "asks for the statistics",
            ("v1",),
            params=("self", "batch", "metrics"),
        ),
        "PPOTrainer._compute_advantage": Pin(
            f"{ppo}.v1.trainer_base",
            "PPOTrainer._compute_advantage",
            "the base advantages gamma scales",
            ("v1",),
            params=("self", "batch", "metrics"),
        ),
        "response_to_nested": Pin(
            f"{workers}.utils.padding",
            "response_to_nested",
            "writes the scaled advantages",
            ("v1",),
            params=("tensor", "response_mask"),
        ),
        "transfer_queue": Pin("transfer_queue", "", "the v1 trainer's data plane", ("v1",)),
        "transfer_queue.kv_batch_get": Pin(
            "transfer_queue", "kv_batch_get", "reads the advantage step's fields", ("v1",)
        ),
        "transfer_queue.kv_batch_put": Pin("transfer_queue", "kv_batch_put", "writes the scaled advantages", ("v1",)),
        # Legacy trainer (RayPPOTrainer; verl-recipe's recipes).
        "RayPPOTrainer.init_workers": Pin(
            f"{ppo}.ray_trainer",
            "RayPPOTrainer.init_workers",
            "wrapped: the anchor worker and the capture",
            ("legacy",),
            params=("self",),
        ),
        "RayPPOTrainer._compute_old_log_prob": Pin(
            f"{ppo}.ray_trainer",
            "RayPPOTrainer._compute_old_log_prob",
            "wrapped: the statistics ride back",
            ("legacy",),
            params=("self", "batch"),
        ),
        "ray_trainer.compute_advantage": Pin(
            f"{ppo}.ray_trainer",
            "compute_advantage",
            "wrapped: gamma on the base advantages",
            ("legacy", "v1"),
            params=("data", "adv_estimator", "gamma", "lam", "num_repeat", "norm_adv_by_std_in_grpo", "config"),
        ),
        "ray_trainer.compute_data_metrics": Pin(
            f"{ppo}.ray_trainer",
            "compute_data_metrics",
            "wrapped: the anchor/* metrics",
            ("legacy",),
            params=("batch",),
        ),
        "metric_utils.compute_data_metrics": Pin(
            f"{ppo}.metric_utils",
            "compute_data_metrics",
            "wrapped: the anchor/* metrics (recipes import it from here)",
            ("legacy",),
            params=("batch",),
        ),
        # CPU mode (VERL_PLATFORM=cpu, rollout.name=hf).
        "rollout": Pin(
            rollout, "", "imported before any rollout.name is resolved: the hf rollout registers then", ("cpu",)
        ),
        "PlatformBase": Pin("verl.plugin.platform", "PlatformBase", "the CPU platform's base", ("cpu",)),
        "PlatformRegistry": Pin("verl.plugin.platform", "PlatformRegistry", "registers the CPU platform", ("cpu",)),
        "load_valuehead_model": Pin(
            "verl.utils.model",
            "load_valuehead_model",
            "wrapped: the critic loads on CPU",
            ("cpu",),
            params=("local_path", "torch_dtype", "model_config", "trust_remote_code"),
        ),
        "_ROLLOUT_REGISTRY": Pin(f"{rollout}.base", "_ROLLOUT_REGISTRY", "registers the hf rollout", ("cpu",)),
        "BaseRollout": Pin(f"{rollout}.base", "BaseRollout", "the hf rollout's base", ("cpu",)),
        "RolloutReplicaRegistry": Pin(
            f"{rollout}.replica", "RolloutReplicaRegistry", "registers the hf replica", ("cpu",)
        ),
        "RolloutReplica": Pin(f"{rollout}.replica", "RolloutReplica", "the hf replica's base", ("cpu",)),
        "RolloutMode": Pin(f"{rollout}.replica", "RolloutMode", "the hf replica's mode", ("cpu",)),
        "TokenOutput": Pin(f"{rollout}.replica", "TokenOutput", "the hf rollout's output", ("cpu",)),
        # Ulysses sequence parallelism.
        "ulysses_flash_attention_forward": Pin(
            "verl.models.transformers.monkey_patch",
            "_flash_attention_forward",
            "wrapped during SP forwards: q/k after verl's all-to-all",
            ("ulysses",),
        ),
        "get_ulysses_sequence_parallel_group": Pin(
            "verl.utils.ulysses",
            "get_ulysses_sequence_parallel_group",
            "the SP group the ranks combine over",
            ("ulysses",),
        ),
        # transformers: where the attention function is looked up on every call.
        "ALL_ATTENTION_FUNCTIONS": Pin(
            "transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS", "the capture's dispatcher sits in it"
        ),
        "ALL_ATTENTION_FUNCTIONS._local_mapping": Pin(
            "transformers.modeling_utils",
            "ALL_ATTENTION_FUNCTIONS._local_mapping",
            "the capture's dispatcher sits in its local layer",
            static=False,
        ),
    }


PINS: dict[str, Pin] = _pins()


def installed_version(distribution: str = "verl") -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _error(problems: list[tuple[Pin, str]]) -> VerlApiError:
    lines = "; ".join(f"{pin.name} ({pin.used_by}) {problem}" for pin, problem in problems)
    return VerlApiError(
        f"the installed verl {installed_version()} lacks what verl_anchor relies on: {lines}. verl_anchor is "
        f"tested with verl {TESTED_VERL}: pip install 'verl[verl-core]=={TESTED_VERL}'"
    )


def _signature_problem(pin: Pin, params: list[str]) -> str | None:
    if pin.params is None or params[: len(pin.params)] == list(pin.params):
        return None
    return f"takes ({', '.join(params)}), not ({', '.join(pin.params)}, ...)"


# ---- live objects ----------------------------------------------------------------------------------------
def resolve(key: str) -> Any:
    """The live object of `PINS[key]` (patched, where the plugin patched it), imported on first use; a
    `VerlApiError` names what is missing."""
    pin = PINS[key]
    try:
        target = sys.modules.get(pin.module) or importlib.import_module(pin.module)
    except ImportError as err:
        raise _error([(pin, f"cannot be imported ({err})")]) from err
    for part in filter(None, pin.attribute.split(".")):
        if not hasattr(target, part):
            raise _error([(pin, "does not exist")])
        target = getattr(target, part)
    if pin.params is not None:
        problem = _signature_problem(pin, list(inspect.signature(target).parameters))
        if problem:
            raise _error([(pin, problem)])
    return target


def patch(key: str, wrap: Callable[[Callable], Callable]) -> Callable:
    """Replace the function or method `PINS[key]` where it lives by `wrap(original)`, once per process."""
    pin = PINS[key]
    original = resolve(key)
    if getattr(original, "_verl_anchor", False):
        return original
    owner_path, _, name = pin.attribute.rpartition(".")
    owner = sys.modules[pin.module]  # imported by resolve
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    wrapped = functools.wraps(original)(wrap(original))
    wrapped._verl_anchor = True
    setattr(owner, name, wrapped)
    return wrapped


def __getattr__(name: str) -> Any:
    """`from verl_anchor.integration.verl_api import TrainingWorker`: the live object, checked."""
    if name in PINS:
        return resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- installed sources, before anything is imported -------------------------------------------------------
def check_installed(pipelines: Iterable[str] = ("all",), roots: dict[str, Path] | None = None) -> None:
    """Check from source that the installed packages have every pin of `pipelines`; one `VerlApiError` lists
    all that are missing. `roots`: package name -> directory, default where Python finds them."""
    if roots is None:
        return _check_installed_once(frozenset(pipelines))
    _check_sources(set(pipelines), roots)


@functools.cache
def _check_installed_once(pipelines: frozenset[str]) -> None:
    _check_sources(set(pipelines), {})


def _check_sources(pipelines: set[str], roots: dict[str, Path]) -> None:
    wanted = pipelines | {"all"}
    unknown = wanted - set(PIPELINES)
    if unknown:
        raise ValueError(f"unknown pipelines {sorted(unknown)}: choose from {', '.join(PIPELINES)}")
    problems = []
    for pin in PINS.values():
        if pin.static and wanted & set(pin.pipelines):
            problem = _source_problem(pin, roots)
            if problem:
                problems.append((pin, problem))
    if problems:
        raise _error(problems)


def _source_problem(pin: Pin, roots: dict[str, Path]) -> str | None:
    path = _source_path(pin.module, roots)
    if path is None:
        return "cannot be found (module missing)"
    node: Any = _parse(path)
    first, *members = pin.attribute.split(".") if pin.attribute else [""]
    if first:
        node = _definition(node.body, first)
        if node is None:  # maybe re-exported by `from .module import *`
            for star in _star_imports(pin.module, _parse(path), path.name == "__init__.py"):
                if _source_problem(dataclasses.replace(pin, module=star, attribute=first), roots) is None:
                    node = ast.Pass()  # found there; its members are only checkable live
                    break
            else:
                return "does not exist"
    for part in members:
        if not isinstance(node, ast.ClassDef):
            return None  # defined by an import or an assignment: its members are only checkable live
        node = _definition(node.body, part)
        if node is None:
            return "does not exist"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        arguments = node.args
        return _signature_problem(
            pin, [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
        )
    return None


def _source_path(module: str, roots: dict[str, Path]) -> Path | None:
    top, *rest = module.split(".")
    root = roots.get(top)
    if root is None:
        spec = importlib.util.find_spec(top)  # a top-level package: found, not imported
        if spec is None or spec.origin is None:
            return None
        root = Path(spec.origin).parent
    base = root.joinpath(*rest)
    candidates = (base.with_suffix(".py"), base / "__init__.py") if rest else (base / "__init__.py",)
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _star_imports(module: str, tree: ast.Module, is_package: bool) -> list[str]:
    """The modules `tree` re-exports with `from ... import *`, as absolute names."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found.append(node.module if node.level == 0 else ".".join(filter(None, (base, node.module))))
    return found


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _definition(body: list[ast.stmt], name: str) -> ast.AST | None:
    """The statement of `body` (descending into if/try blocks) that defines `name`, if any."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (alias.asname or alias.name.split(".")[0]) == name for alias in node.names
        ):
            return node
        if isinstance(node, (ast.If, ast.Try)):
            blocks = [
                node.body,
                node.orelse,
                getattr(node, "finalbody", []),
                *(handler.body for handler in getattr(node, "handlers", [])),
            ]
            for block in blocks:
                if (found := _definition(block, name)) is not None:
                    return found
    return None
