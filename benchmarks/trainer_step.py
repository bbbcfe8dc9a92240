"""The real training step (``DMCVBTrainer.train_step``) as a benchmark subject: timing, a torch.profiler
breakdown by part, the per-time-step loop's share, FLOPs and peak memory.

Used by ``benchmarks/run_all.py``; importable on its own::

    h = TrainerHarness(step_config("cpu"), torch.device("cpu"))
    times = h.time_steps(repeats=3)             # seconds per full step (four tasks, aggregator, disc, EMA)
    profile = h.profile_step()                  # shares of each part, loop share, top ops
    flops, by_part = h.count_flops()            # FlopCounterMode over one step, and by part

Nothing here edits or depends on the model's internal names. Attribution works from the outside:

* **phases** (forward, per-task gradients, aggregator, optimiser, discriminator step, EMA) come from
  wrapping, on the instance and only while profiling, the trainer's collaborators that the step calls:
  ``model.compute_total_loss``, ``aggregator.backward`` / ``aggregator.aggregate``, ``optimizer.step``,
  ``scheduler.step``, ``model.discriminator_loss``, ``disc_optimizer.step``, ``ema.update`` and
  ``torch.nn.utils.clip_grad_norm_``. A collaborator that no longer exists is simply not wrapped; its time
  then shows under "trainer: other".
* **parts of the forward** come from forward pre/post hooks on every submodule, each opening a
  ``record_function`` scope named after the module's path; a path maps to a part by its components
  (``PART_RULES``), unknown paths go to ``other: <top-level name>``.
* **backward** work is attributed to the forward part that created it: an autograd node's profiler event
  carries the ``sequence_nr`` of the forward op that built it. So "per-task gradients" is split by the
  part the gradient flows through, and the discriminator's own backward counts in "discriminator step".
* **the per-time-step loop**: modules called at least T times in one forward are per-step modules; a loop
  is a run of their calls (a gap of more than 2 % of the step between two calls starts a new run, so the
  batched decoder between the observation loop and the overshooting rollout is outside both). Its share =
  forward time in those runs plus the backward of the nodes created in them, over the whole step (None for
  T < 4, where a module called two or three times per forward cannot be told from a per-step one).

Times are CPU self time on a CPU (every op's own time, so the parts add up to the profiled step) and
device self time on CUDA (kernels; the rest of the step's wall time is reported as idle).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

import VRNN

from VRNN.aime_config import AIMEConfig
from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder

ACTION_DIM = 6  # cheetah-run

# Report order of the parts; every profiled microsecond lands in exactly one of them (or "other: ...").
PARTS = (
    "encoder", "perceiver", "prior loop", "attention", "decoder & likelihood", "discriminator (in the loss)",
    "forward: other", "per-task gradients", "aggregator", "optimiser", "discriminator step", "EMA update",
    "trainer: other",
)
FORWARD_PARTS = PARTS[:7]

# Module path -> part. The top-level child decides when it is known; otherwise any path component
# containing a keyword decides (first rule that matches). Unknown modules: "other: <top-level>".
TOP_LEVEL_PARTS = {
    "encoder": "encoder", "perceiver": "perceiver", "decoder": "decoder & likelihood",
    "likelihood": "decoder & likelihood", "discriminator": "discriminator (in the loss)",
}
PART_RULES = (
    (("attention", "slot", "saliency"), "attention"),
    (("perceiver",), "perceiver"),
    (("encoder",), "encoder"),
    (("decoder", "likelihood", "head_out", "pixel"), "decoder & likelihood"),
    (("discriminator", "critic"), "discriminator (in the loss)"),
    (("cell", "prior", "posterior", "lstm", "rnn", "gru", "transition", "dynamics", "stick"), "prior loop"),
)

MODULE_PREFIX = "aime.mod/"
PHASE_PREFIX = "aime.phase/"
STEP_LABEL = "aime.step"
BACKWARD_EVENT = "autograd::engine::evaluate_function:"
MIN_LOOP_T = 4
# Two per-step module calls further apart than this share of the step belong to different loops.
LOOP_GAP_SHARE = 0.02


def part_of_module(path: str) -> str:
    """The part a module path ("cell.attention.slot_attention.mlp.0") belongs to."""
    parts = [p.lower() for p in path.split(".") if p]
    if not parts:
        return "forward: other"
    if parts[0] in TOP_LEVEL_PARTS:
        return TOP_LEVEL_PARTS[parts[0]]
    for keywords, part in PART_RULES:
        if any(k in component for component in parts for k in keywords):
            return part
    return f"other: {parts[0]}"


# ---------------------------------------------------------------------------------------------------
# The subject: a trainer on a synthetic batch
def step_config(preset: str, batch: int | None = None, seq: int | None = None, aggregator: str | None = None,
                max_seq_len: int | None = None) -> AIMEConfig:
    """The preset at B = ``batch``, T = ``seq`` (its own when None). The Perceiver's longest sequence is
    raised to ``max(T, max_seq_len)`` when the preset's is shorter (that only sizes a position table)."""
    config = AIMEConfig.preset(preset)
    b, t = batch or config.batch_size, seq or config.sequence_length
    overrides: dict[str, Any] = {"batch_size": b, "sequence_length": t}
    longest = max(t, max_seq_len or 0)
    if longest > config.perceiver_max_seq_len:
        overrides["perceiver_max_seq_len"] = longest
    if aggregator is not None:
        overrides["aggregator"] = aggregator
    return config.replace(**overrides)


class SyntheticWindows(Dataset):
    """Items shaped like ``DMCVBDataset(scale="float")``'s: random frames in [-1, 1] (quantised like uint8
    frames), actions in [-1, 1]. The step's cost does not depend on the pixel values."""

    def __init__(self, sequence_length: int, length: int = 64, action_dim: int = ACTION_DIM, seed: int = 0,
                 image_size: int = 64) -> None:
        self.sequence_length, self.length, self.action_dim = sequence_length, length, action_dim
        self.seed, self.image_size = seed, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(i))
        t, s = self.sequence_length, self.image_size
        frames = torch.randint(0, 256, (t, 3, s, s), generator=g, dtype=torch.uint8).float() / 127.5 - 1.0
        actions = torch.rand(t, self.action_dim, generator=g) * 2 - 1
        is_first = torch.zeros(t, dtype=torch.bool)
        return {"observations": frames, "actions": actions, "rewards": torch.zeros(t), "is_first": is_first}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SingleBackward:
    """Stands in for the trainer's aggregator: one backward pass of the summed task losses (what any
    multi-task aggregator is measured against; the registry's ``sum`` still takes one gradient per task)."""

    name = "single backward of the summed losses"

    def backward(self, losses, shared_params, *args, **kwargs) -> dict[str, Any]:
        values = list(losses.values()) if isinstance(losses, dict) else list(losses)
        torch.autograd.backward(torch.stack([v.reshape(()) for v in values]).sum())
        n = len(values)
        return {"grad_norms": torch.zeros(n), "cosines": torch.zeros(n, n), "active": torch.zeros(n, dtype=torch.bool)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainerHarness:
    """A ``DMCVBTrainer`` (the real one: its optimisers, aggregator, discriminator step and EMA) on one
    fixed synthetic batch of the config's B x T (``single_backward``: its aggregator replaced by one
    backward of the summed losses, the reference for the aggregator's cost). The schedules are set past
    their warm-ups (the trainer's ``step`` counter), so the step costs what most of a run's steps cost."""

    def __init__(self, config: AIMEConfig, device: torch.device, seed: int = 0, single_backward: bool = False) -> None:
        self.config, self.device = config, torch.device(device)
        torch.manual_seed(seed)
        model = DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=ACTION_DIM).to(self.device)
        data = SyntheticWindows(config.sequence_length, length=max(4, config.batch_size), seed=seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="aime-bench-")
        self.trainer = DMCVBTrainer(model, data, data, config, Path(self._tmp.name), device=self.device,
                                    progress=False)
        if single_backward:
            self.trainer.aggregator = SingleBackward()
        warmups = [getattr(config, k, 0) for k in ("beta_warmup_steps", "adversarial_warmup_steps", "warmup_steps")]
        warmups.append(getattr(config, "adversarial_start_steps", 0) + getattr(config, "adversarial_warmup_steps", 0))
        if hasattr(self.trainer, "step"):
            self.trainer.step = max(warmups)
        self.batch = collate([data[i] for i in range(config.batch_size)])
        self.frames = config.batch_size * config.sequence_length
        self.skipped = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def step(self) -> None:
        if self.trainer.train_step(self.batch) is None:
            self.skipped += 1
        sync(self.device)

    def time_steps(self, repeats: int, warmup: int = 1) -> list[float]:
        """Seconds of each of ``repeats`` steps after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self.step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return times

    def count_flops(self) -> tuple[float, dict[str, float]]:
        """FLOPs of one step (FlopCounterMode: matmuls, convolutions, attention, forward and backward;
        elementwise work is not counted), and the same FLOPs by part: forward ops by the module that ran
        them, the rest by phase (the per-task backward passes, the aggregator, ...)."""
        phases: list[str] = []
        paths: list[str] = []

        @contextlib.contextmanager
        def push(label: str):
            stack = paths if label.startswith(MODULE_PREFIX) else phases
            stack.append(label.split("/", 1)[1])
            try:
                yield
            finally:
                stack.pop()

        by_part: dict[str, float] = defaultdict(float)

        def where() -> str:
            phase = phases[-1] if phases else None
            if phase in ("forward", None) and paths:
                return _forward_part(paths[-1], phase, False)
            return {"forward": "forward: other", "task_gradients": "per-task gradients (backward)",
                    "aggregate": "aggregator", "optimizer": "optimiser", "disc_forward": "discriminator step",
                    "disc_optimizer": "discriminator step", "ema": "EMA update"}.get(phase, "trainer: other")

        class PartFlops(FlopCounterMode):
            def _count_flops(self, func_packet, out, args, kwargs):  # torch's hook per counted op
                if func_packet in self.flop_registry:
                    by_part[where()] += float(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
                return out

        with instrument(self.trainer, scope=push), PartFlops(display=False) as counter:
            self.step()
        total = sum(by_part.values()) or float(counter.get_total_flops())  # a torch without the hook: total only
        return total, dict(sorted(by_part.items(), key=lambda kv: -kv[1]))

    def profile_step(self, top_ops: int = 12) -> dict[str, Any]:
        """One profiled step (after the caller's warm-up), broken down by part; see the module docstring."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with instrument(self.trainer):
            with profile(activities=activities) as prof:
                with record_function(STEP_LABEL):
                    t0 = time.perf_counter()
                    self.step()
                    wall = time.perf_counter() - t0
        result = attribute(light_events(prof), self.config.sequence_length, device=self.device.type == "cuda",
                           top_ops=top_ops)
        result["profiled_step_s"] = wall
        return result

    def phase_times(self) -> dict[str, Any]:
        """One step without the profiler, its phases timed by the same wrappers (perf_counter): a check on
        the profiler's shares, which the profiler's per-op overhead tilts towards many-small-op parts."""
        spent: dict[str, float] = defaultdict(float)

        @contextlib.contextmanager
        def timer(label: str):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                sync(self.device)
                spent[label[len(PHASE_PREFIX):]] += time.perf_counter() - t0

        with instrument(self.trainer, scope=timer, modules=False):
            t0 = time.perf_counter()
            self.step()
            wall = time.perf_counter() - t0
        phases = {
            "forward (compute_total_loss)": spent["forward"],
            "per-task gradients (aggregator.backward less aggregate)": spent["task_gradients"] - spent["aggregate"],
            "aggregator (aggregate)": spent["aggregate"],
            "optimiser (clip, AdamW, schedule)": spent["optimizer"],
            "discriminator step (less its backward)": spent["disc_forward"] + spent["disc_optimizer"],
            "EMA update": spent["ema"],
        }
        phases["rest (discriminator backward, trainer glue)"] = max(0.0, wall - sum(phases.values()))
        return {"step_s": wall, "seconds": phases, "shares": {k: v / wall for k, v in phases.items()}}

    def close(self) -> None:
        self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------------
# Instrumentation (installed only around the profiled step, removed afterwards)
@contextlib.contextmanager
def instrument(trainer: Any, scope: Callable[[str], Any] = record_function, modules: bool = True) -> Iterator[None]:
    """Phase scopes around the trainer's collaborators (``scope(label)`` context managers: profiler
    ``record_function`` by default) and, with ``modules``, a profiler scope around every submodule's forward."""
    undo: list[Callable[[], None]] = []
    try:
        model = getattr(trainer, "model", None)
        roots = [model] if isinstance(model, torch.nn.Module) else []
        ema = getattr(getattr(trainer, "ema", None), "module", None)
        if isinstance(ema, torch.nn.Module):
            roots.append(ema)
        for root in roots if modules else []:
            undo.extend(_module_scopes(root, scope))
        disc_params = {id(p) for p in getattr(trainer, "disc_params", [])}
        for obj_name, attr, label in (
            ("model", "compute_total_loss", "forward"), ("aggregator", "backward", "task_gradients"),
            ("aggregator", "aggregate", "aggregate"), ("optimizer", "step", "optimizer"),
            ("scheduler", "step", "optimizer"), ("model", "discriminator_loss", "disc_forward"),
            ("disc_optimizer", "step", "disc_optimizer"), ("disc_scheduler", "step", "disc_optimizer"),
            ("ema", "update", "ema"),
        ):
            obj = getattr(trainer, obj_name, None)
            if obj is not None:
                undo.append(_wrap_attr(obj, attr, PHASE_PREFIX + label, scope))
        clip = torch.nn.utils.clip_grad_norm_

        def scoped_clip(parameters, *args, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            label = "disc_optimizer" if params and id(params[0]) in disc_params else "optimizer"
            with scope(PHASE_PREFIX + label):
                return clip(params, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = scoped_clip
        undo.append(lambda: setattr(torch.nn.utils, "clip_grad_norm_", clip))
        yield
    finally:
        for fn in reversed(undo):
            fn()


def _module_scopes(root: torch.nn.Module, scope: Callable[[str], Any] = record_function) -> list[Callable[[], None]]:
    handles = []
    for name, module in root.named_modules():
        if not name:
            continue
        label = MODULE_PREFIX + name
        stack: list[Any] = []

        def pre(_module, _args, label=label, stack=stack):
            rf = scope(label)
            rf.__enter__()
            stack.append(rf)

        def post(_module, _args, _output, stack=stack):
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return [h.remove for h in handles]


def _wrap_attr(obj: Any, attr: str, label: str, scope: Callable[[str], Any] = record_function) -> Callable[[], None]:
    original = getattr(obj, attr, None)
    if not callable(original):
        return lambda: None
    own = vars(obj).get(attr, _MISSING) if hasattr(obj, "__dict__") else _MISSING

    def wrapped(*args, **kwargs):
        with scope(label):
            return original(*args, **kwargs)

    for marker in ("_wrapped_by_lr_sched",):  # what LRScheduler looks for on optimizer.step
        if hasattr(original, marker):
            setattr(wrapped, marker, getattr(original, marker))

    try:
        setattr(obj, attr, wrapped)
    except (AttributeError, TypeError):
        return lambda: None

    def restore() -> None:
        if own is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)
        else:
            setattr(obj, attr, own)
    return restore


_MISSING = object()


# ---------------------------------------------------------------------------------------------------
# Attribution of profiler events
def _adopt_orphans(events: list[Event]) -> None:
    """Top-level events of other threads inside the step (CUDA: the autograd device thread, runtime
    launches recorded under another thread id) get the innermost event of the step's thread that was open
    at their start as parent, so that they inherit its phase and module scopes. Self times stay as they
    are (the other thread's time is not the step thread's)."""
    steps = [e for e in events if e.name == STEP_LABEL]
    if not steps:
        return
    step = steps[0]
    children: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        if e.parent is not None and e.thread == step.thread:
            children[id(e.parent)].append(e)
    for kids in children.values():
        kids.sort(key=lambda e: e.start)
    starts = {key: [k.start for k in kids] for key, kids in children.items()}
    for e in events:
        if e.parent is not None or e.thread == step.thread or not step.start <= e.start <= step.end:
            continue
        host = step
        while True:
            kids = children.get(id(host), [])
            i = bisect.bisect_right(starts.get(id(host), []), e.start) - 1
            if i >= 0 and kids[i].start <= e.start < kids[i].end:
                host = kids[i]
            else:
                break
        e.parent = host


class Event:
    """One profiler event, the few fields the attribution needs (times in microseconds)."""

    __slots__ = ("name", "start", "end", "thread", "seq", "fwd_thread", "parent", "self_time", "device_time",
                 "correlation")

    def __init__(self, name: str, start: float, end: float, thread: int, seq: int, fwd_thread: int,
                 correlation: int = 0) -> None:
        self.name, self.start, self.end, self.thread = name, start, end, thread
        self.seq, self.fwd_thread, self.correlation = seq, fwd_thread, correlation
        self.parent: Event | None = None
        self.self_time = end - start
        self.device_time = 0.0  # kernels this event launched itself (CUDA)


def light_events(prof: Any) -> list[Event]:
    """The profile's CPU events nested per thread (parent = the innermost enclosing event), with self times,
    and on CUDA each kernel's time credited to the CPU event that launched it. Reads the raw Kineto events
    (torch's ``prof.events()`` takes seconds per 10^4 events); falls back to ``prof.events()``."""
    try:
        raw = prof.profiler.kineto_results.events()
        cpu, kernels = [], []
        for e in raw:
            if e.is_async():
                continue
            device = str(e.device_type())
            start = e.start_ns() / 1e3
            end = start + e.duration_ns() / 1e3
            if device.endswith("CPU"):
                cpu.append(Event(e.name(), start, end, e.start_thread_id(), e.sequence_nr(), e.fwd_thread_id(),
                                 e.correlation_id()))
            else:
                kernels.append((e.linked_correlation_id() or e.correlation_id(), end - start))
    except (AttributeError, RuntimeError):
        cpu, kernels = [], []
        for e in prof.events():
            if getattr(e, "is_async", False):
                continue
            if str(getattr(e, "device_type", "CPU")).endswith("CPU"):
                cpu.append(Event(e.name, e.time_range.start, e.time_range.end, e.thread,
                                 getattr(e, "sequence_nr", -1), getattr(e, "fwd_thread", 0) or 0,
                                 getattr(e, "id", 0)))
                cpu[-1].device_time = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
    by_thread: dict[int, list[Event]] = defaultdict(list)
    for e in cpu:
        by_thread[e.thread].append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e.start, -e.end))
        stack: list[Event] = []
        for e in events:
            while stack and stack[-1].end <= e.start:
                stack.pop()
            if stack and e.end <= stack[-1].end + 1e-3:
                e.parent = stack[-1]
                stack[-1].self_time -= e.end - e.start
            stack.append(e)
    _adopt_orphans(cpu)
    if kernels:
        launcher = {e.correlation: e for e in cpu if e.correlation}
        for corr, duration in kernels:
            if corr in launcher:
                launcher[corr].device_time += duration
    return cpu


def _scopes(event: Any) -> tuple[str | None, str | None, Any]:
    """(innermost module path, innermost phase, innermost autograd-node event) above and at ``event``."""
    module = phase = node = None
    e = event
    while e is not None:
        name = e.name
        if module is None and name.startswith(MODULE_PREFIX):
            module = name[len(MODULE_PREFIX):]
        elif phase is None and name.startswith(PHASE_PREFIX):
            phase = name[len(PHASE_PREFIX):]
        elif node is None and name.startswith(BACKWARD_EVENT):
            node = e
        e = e.parent
    return module, phase, node


def attribute(events: Any, seq_len: int, device: bool = False, top_ops: int = 12) -> dict[str, Any]:
    """Shares of the step by part, the per-time-step loop's share and the costliest ops, from the events
    of one profiled step (see the module docstring)."""
    own = (lambda e: e.device_time) if device else (lambda e: max(0.0, e.self_time))
    cpu_events = list(events)
    steps = [e for e in cpu_events if e.name == STEP_LABEL]
    if not steps:
        raise RuntimeError("the profiled step left no events")
    step = steps[0]
    lo, hi = step.start, step.end

    # 1. forward events: their scopes, module call counts in the forward (to find per-step modules)
    info = []
    calls: Counter[str] = Counter()
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in cpu_events:
        if not lo <= e.start <= hi or e is step:
            continue
        module, phase, node = _scopes(e)
        info.append((e, module, phase, node))
        # (no phase at all: the model's loss method was renamed; its modules still mark the forward)
        if e.name.startswith(MODULE_PREFIX) and phase in ("forward", None) and node is None:
            calls[module] += 1
            spans[module].append((e.start, e.end))
    # T < 4 cannot tell a per-step module from one called two or three times in a forward (the
    # discriminator on fake and real frames, the encoder and its EMA copy): no loop figure then.
    loop_measurable = seq_len >= MIN_LOOP_T
    per_step = [m for m, n in calls.items() if n >= seq_len] if loop_measurable else []
    # The loops: runs of per-step module calls. A gap of more than LOOP_GAP_SHARE of the step between two
    # calls ends a run, so batched work between two loops (the observation loop, then the decoder, then the
    # overshooting rollout) is not counted as in a loop.
    loops = _runs(sorted(span for m in per_step for span in spans[m]), LOOP_GAP_SHARE * (hi - lo))
    in_loop_at = lambda t: any(a <= t <= b for a, b in loops)

    # 2. forward ops' sequence numbers -> (part, phase, in the loop)
    made_by: dict[tuple[int, int], tuple[str, str | None, bool]] = {}
    for e, module, phase, node in info:
        seq = e.seq
        if node is not None or seq is None or seq < 0:
            continue
        in_loop = in_loop_at(e.start)
        made_by.setdefault((e.thread, seq), (_forward_part(module, phase, in_loop), phase, in_loop))

    by_seq = {seq: value for (_, seq), value in made_by.items()}

    # 3. every event's own time into one part
    shares: dict[str, float] = defaultdict(float)
    backward_by_part: dict[str, float] = defaultdict(float)
    op_time: dict[str, float] = defaultdict(float)
    loop_forward = loop_backward = forward_total = 0.0
    unmatched_backward = 0.0
    total = own(step)
    shares["trainer: other"] += total  # the step's own Python time outside every op
    for e, module, phase, node in info:
        t = own(e)
        total += t
        if t <= 0:
            continue
        if not e.name.startswith(("aime.", BACKWARD_EVENT)):
            op_time[e.name] += t
        origin = None
        if node is not None:
            seq = node.seq
            origin = made_by.get((node.fwd_thread, seq)) or made_by.get((node.thread, seq))
            if origin is None:  # fwd_thread numbering differs between versions: match by number alone
                origin = by_seq.get(seq)
        if phase in ("aggregate",):
            part = "aggregator"
        elif phase in ("optimizer",):
            part = "optimiser"
        elif phase in ("disc_forward", "disc_optimizer"):
            part = "discriminator step"
        elif phase == "ema":
            part = "EMA update"
        elif node is not None:  # backward work outside the per-task gradient pass: where it came from
            if phase == "task_gradients":
                part = "per-task gradients"
            elif origin is not None and origin[1] == "disc_forward":
                part = "discriminator step"
            else:
                part = "per-task gradients" if origin is not None and origin[1] in ("forward", None) \
                    else "trainer: other"
            if part == "per-task gradients":
                if origin is None:
                    unmatched_backward += t
                backward_by_part[origin[0] if origin else "unmatched"] += t
                if origin is not None and origin[2]:
                    loop_backward += t
        elif phase == "task_gradients":  # the aggregator's own glue (building G [T, D], writing .grad)
            part = "aggregator"
        elif phase == "forward" or (phase is None and module is not None):
            in_loop = in_loop_at(e.start)
            part = _forward_part(module, phase, in_loop)
            forward_total += t
            if in_loop:
                loop_forward += t
        else:
            part = "trainer: other"
        shares[part] += t
    total = max(total, 1e-9)
    wall = float(step.end - step.start)
    ordered = {p: shares.get(p, 0.0) / total for p in PARTS}
    ordered.update({p: v / total for p, v in sorted(shares.items()) if p not in ordered})
    fwd_bwd = {p: (shares.get(p, 0.0) + backward_by_part.get(p, 0.0)) / total
               for p in {*FORWARD_PARTS, *backward_by_part} if shares.get(p, 0.0) + backward_by_part.get(p, 0.0) > 0}
    return {
        "time_kind": "device self time (CUDA kernels)" if device else "CPU self time",
        "total_ms": total / 1e3, "step_event_ms": wall / 1e3,
        "idle_share": max(0.0, 1 - total / wall) if device and wall > 0 else 0.0,
        "shares": ordered,
        "backward_by_part": {p: v / total for p, v in sorted(backward_by_part.items(), key=lambda kv: -kv[1])},
        "forward_plus_backward": dict(sorted(fwd_bwd.items(), key=lambda kv: -kv[1])),
        "loop_share": (loop_forward + loop_backward) / total if loop_measurable else None,
        "loop_forward_share": loop_forward / total if loop_measurable else None,
        "loop_backward_share": loop_backward / total if loop_measurable else None,
        "loop_share_of_forward": (loop_forward / forward_total if forward_total > 0 else 0.0)
        if loop_measurable else None,
        "per_step_modules": len(per_step),
        "unmatched_backward_share": unmatched_backward / total,
        "top_ops": [{"op": k, "share": v / total}
                    for k, v in sorted(op_time.items(), key=lambda kv: -kv[1])[:top_ops]],
    }


def _runs(spans: list[tuple[float, float]], max_gap: float) -> list[tuple[float, float]]:
    """Sorted (start, end) spans -> the runs they form, a new run wherever the next span starts more than
    ``max_gap`` after the latest end so far."""
    runs: list[tuple[float, float]] = []
    for a, b in spans:
        if runs and a - runs[-1][1] <= max_gap:
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
        else:
            runs.append((a, b))
    return runs


def _forward_part(module: str | None, phase: str | None, in_loop: bool) -> str:
    if module is not None:
        part = part_of_module(module)
        if part.startswith("other: ") and in_loop:
            return "prior loop"
        return part
    return "prior loop" if in_loop else "forward: other"


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/trainer_step.py --preset cpu --repeats 5``: one JSON line with the step times of
    the preset's own B x T, for the ``VRNN`` package that this interpreter imports (run_all.py's ``shipped``
    section points PYTHONPATH at an older tree to time that code's step with this same harness)."""
    parser = argparse.ArgumentParser(description="The real training step of a preset (its own B x T) timed with "
                                     "the VRNN package this interpreter imports; prints one JSON line: the step "
                                     "times in seconds, the shape, and where VRNN came from.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="config preset whose step is timed (its own B x T)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = step_config(args.preset)
    harness = TrainerHarness(config, torch.device(args.device))
    times = harness.time_steps(args.repeats, warmup=args.warmup)
    print(json.dumps({"preset": args.preset, "batch": config.batch_size, "seq": config.sequence_length,
                      "frames": harness.frames, "step_s": times, "skipped": harness.skipped,
                      "vrnn_path": str(Path(VRNN.__file__).resolve().parent)}))
    harness.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
