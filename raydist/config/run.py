"""RunSpec: every knob of one training run, each with its documentation and its validation rule.

Inner code trusts a validated spec. Names that live in a registry (strategy, model, data,
optimizer, ...) are checked against that registry (knobs.registry_of): config sits above the
registries it checks names against, and imports them when it validates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from raydist.config import knobs, values
from raydist.config.knobs import ON_RAY, at_least, default_of, knob, positive, unit_interval, worker_count
from raydist.config.values import coerce, fold, is_import_path, parse_size
from raydist.errors import ConfigError, closest

DEFAULT_BATCH = 64
"""The global batch of a spec that gives neither batch_size nor batch_per_worker."""

# The strategies whose step (engine/levers.py) honours the loop's levers (ps, pipeline: not yet)
LEVERS = ("local", "ddp", "fsdp", "tp")

SEED_MAX = 2**32 - 1
"""numpy's bound for a seed; torch's generators overflow past 2**63 - 1 (and the batch order's
seed * 1_000_003 + epoch must stay below that)."""


@dataclass
class RunSpec:
    # --- what to train, how it is spread --------------------------------------------------
    strategy: str = knob("local", "how the run is spread over Ray",
                         registry=True)
    model: str = knob("mlp", "network to train: a registered name, or a factory of your own as "
                      "module.path:function, called as function(data, **model_args)",
                      registry=True)
    data: str = knob("digits", "data set: a registered name, csv:PATH, parquet:PATH, or a loader of "
                     "your own as module.path:function, called as function(**data_args)",
                     registry=True)
    optimizer: str = knob("adam", "update rule (the article's six and more)",
                          registry=True)
    # --- optimizer ---------------------------------------------------------------------------
    lr: float | None = knob(None, "learning rate; empty means the optimizer's documented default",
                            check=positive, expected="a number > 0")
    lr_scaling: str = knob("none", "lr for the global batch: as given (none), x global batch / "
                           "base_batch (linear), or x its square root (sqrt)",
                           registry=True)
    base_batch: int = knob(DEFAULT_BATCH, "lr_scaling: the global batch lr was tuned for (the "
                           "optimizers' default lrs: 64, mlp on digits)", check=at_least(1),
                           expected="an integer >= 1")
    warmup_steps: int = knob(0, "optimizer steps of linear warmup: step s uses lr x (s+1)/"
                             "(warmup_steps+1), the full (scaled) lr from step warmup_steps on",
                             check=at_least(0), expected="an integer >= 0")
    lr_schedule: str = knob("constant", "lr after warmup, per optimizer step: constant, cosine (to 0 "
                            "at the end of the run), step (x lr_gamma every lr_step_size steps)",
                            registry=True)
    lr_step_size: int = knob(1000, "lr_schedule step: optimizer steps between two decays",
                             check=at_least(1), expected="an integer >= 1")
    lr_gamma: float = knob(0.1, "lr_schedule step: factor of each decay", check=lambda x: 0 < x <= 1,
                           expected="a number in (0, 1]")
    beta: float = knob(0.9, "decay of momentum's m, RMSprop's R and Muon's momentum",
                       check=unit_interval, expected="a number in [0, 1)")
    beta1: float = knob(0.9, "Adam's first-moment decay (and lamb's, lion's, schedule-free's)",
                        check=unit_interval, expected="a number in [0, 1)")
    beta2: float = knob(0.999, "Adam's second-moment decay (and lamb's, schedule-free's; lion's "
                        "momentum decay, 0.99 in its paper)", check=unit_interval,
                        expected="a number in [0, 1)")
    eps: float = knob(1e-8, "added outside the square root", check=positive,
                      expected="a number > 0")
    weight_decay: float = knob(0.0, "L2 penalty (decoupled for adamw and the five newer rules: "
                               "muon, lamb, adafactor, lion, schedule-free-adamw)", check=at_least(0),
                               expected="a number >= 0")
    # --- schedule ----------------------------------------------------------------------------
    epochs: int = knob(5, "passes over the training set", check=at_least(1),
                       expected="an integer >= 1", resumable=True)
    batch_size: int | None = knob(None, "GLOBAL batch, whatever the worker count (gd: the whole "
                                  "set); 64 unless batch_per_worker is given", check=at_least(1),
                                  expected="an integer >= 1")
    batch_per_worker: int | None = knob(None, "weak scaling, instead of batch_size: samples per "
                                        "data-parallel replica; the global batch is this x workers "
                                        "(ddp, ps) or x 1 (local; pipeline, whose stages split the "
                                        "model, not the batch)", check=at_least(1),
                                        expected="an integer >= 1")
    workers: int | list[int] = knob(1, "data-parallel replicas (ddp, ps, fsdp); tp: all its "
                                    "workers, tp_size x the data-parallel groups; ddp also takes a "
                                    "range MIN-MAX ([min, max] in YAML): elastic, grows when nodes "
                                    "join", check=worker_count,
                                    expected="an integer >= 1, or [min, max] with 1 <= min <= max",
                                    strategies=("ddp", "ps", "fsdp", "tp"), resumable=("ddp", "fsdp"))
    seed: int = knob(0, "seed of weights, data split and batch order", check=lambda x: 0 <= x <= SEED_MAX,
                     expected=f"an integer from 0 to {SEED_MAX}")
    model_args: dict[str, Any] = knob({}, "keyword arguments of your model factory, e.g. {width: 256} "
                                      "(--model-arg width=256, repeatable)")
    data_args: dict[str, Any] = knob({}, "keyword arguments of your data loader (--data-arg KEY=VALUE)")
    loss: str | None = knob(None, "your own loss as module.path:function(output, target), the SUM "
                            "over the batch's samples (default: from the targets' dtype)")
    # --- model options -----------------------------------------------------------------------
    hidden: list[int] = knob([64], "mlp hidden sizes, e.g. 64,32 (the article's net: 10)",
                             check=lambda v: all(h >= 1 for h in v),
                             expected="a list of integers >= 1")
    channels: int = knob(16, "cnn: channels of the first conv layer; resnet: of its first stage "
                         "(64: ResNet-18)", check=at_least(1),
                         expected="an integer >= 1")
    layers: int = knob(2, "transformer, gpt: decoder blocks", check=at_least(1),
                       expected="an integer >= 1")
    d_model: int = knob(64, "transformer, gpt: width", check=at_least(1), expected="an integer >= 1")
    heads: int = knob(4, "transformer, gpt: attention heads", check=at_least(1),
                      expected="an integer >= 1")
    tie_head: bool = knob(False, "gpt: the output layer shares the token embedding's weights")
    seq_len: int = knob(32, "text: characters per training sequence", check=at_least(2),
                        expected="an integer >= 2")
    # --- data options ------------------------------------------------------------------------
    target: str | None = knob(None, "csv/parquet: target column (default: the last column)")
    val_fraction: float = knob(0.2, "share of the data held out for validation",
                               check=lambda x: 0 < x < 1, expected="a number in (0, 1)")
    samples: int = knob(2000, "synthetic, images: number of samples", check=at_least(10),
                        expected="an integer >= 10")
    text_chars: int = knob(200_000, "text: characters of the corpus used", check=at_least(1000),
                           expected="an integer >= 1000")
    # --- the training loop's levers (raydist/engine/levers.py) ---------------------------------
    grad_accum_steps: int = knob(1, "micro-steps each worker splits its share of a global batch into, "
                                 "their gradients summed before one optimizer step (same global batch, "
                                 "loss and lr schedule)", check=at_least(1), expected="an integer >= 1",
                                 strategies=LEVERS)
    clip_grad_norm: float | None = knob(None, "clip the whole model's gradient to this global 2-norm "
                                        "before each optimizer step (empty: no clipping)",
                                        check=positive, expected="a number > 0", strategies=LEVERS)
    precision: str = knob("float32", "bf16-mixed: forward and backward under torch.autocast in "
                          "bfloat16; weights, gradient reduction and optimizer state stay float32",
                          choices=("float32", "bf16-mixed"), strategies=LEVERS)
    activation_checkpointing: str = knob("none", "blocks: each block of the model recomputes its "
                                         "activations in the backward (raydist.models.blocks)",
                                         choices=("none", "blocks"), strategies=LEVERS)
    compile: bool = knob(False, "torch.compile each block (needs a C++ compiler)", strategies=LEVERS)
    # --- where and how fast it runs: none of these changes what a run computes ---------------
    out: str = knob("results/run", "directory for spec.yaml, metrics.csv, model.pt", resumable=True)
    address: str | None = knob(None, f"Ray cluster to join: {values.RAY_ADDRESS_FORMS}; default: "
                               "RAY_ADDRESS, else the local Ray `raydist ray start` keeps, else an embedded "
                               f"one; one where nothing answers in {values.PROBE_S:g} s is an error",
                               check=values.is_ray_address, expected=values.RAY_ADDRESS_FORMS,
                               strategies=ON_RAY, resumable=True)
    max_failures: int = knob(0, "restarts from the latest checkpoint after a worker dies",
                             check=at_least(0), expected="an integer >= 0", strategies=ON_RAY,
                             resumable=True)
    stall_timeout_s: float = knob(300.0, "seconds without a finished training step after which the "
                                  "run stops with one line saying what it waits on (exit 1); a "
                                  "run's first step gets at least 120 s, later ones at least 10x "
                                  "the slowest step (raydist/runtime/stall.py)", check=positive,
                                  expected="a number > 0", strategies=ON_RAY, resumable=True)
    threads_per_worker: int = knob(1, "torch threads in each worker process",
                                   check=at_least(1), expected="an integer >= 1", resumable=True)
    straggler: float = knob(1.0, "ps: slow-down factor of replica 0 (benchmarks)",
                            check=at_least(1), expected="a number >= 1", strategies=("ps",),
                            resumable=True)
    tracking: str | None = knob(None, "log every epoch to tensorboard (event files in OUT/tensorboard/) "
                                "or mlflow (MLFLOW_TRACKING_URI, else OUT/mlruns/); in a sweep, "
                                "Tune's callbacks track each trial", registry=True)
    memory_per_worker: str | None = knob(None, "bytes of memory each worker may hold, e.g. 2GiB or "
                                         "16GB: the pre-flight refuses a strategy whose predicted "
                                         "model state per worker (parameters, gradients, optimizer "
                                         "state: raydist/memory/footprint.py) is larger", resumable=True,
                                         check=lambda v: (parse_size(v) or 0) > 0,
                                         expected="a size > 0 like 2GiB, 512MiB or 16GB")
    # not resumable: a resumed run with other tracking would leave its epochs tracked in part
    use_gpu: bool | None = knob(None, "ddp, fsdp, pipeline, tp: train on GPUs (default: when "
                                "the cluster has some now)", strategies=("ddp", "fsdp", "pipeline", "tp"),
                                resumable=True)
    # --- ddp ---------------------------------------------------------------------------------
    grad_compression: str = knob("none", "ddp: gradient communication hook (none, fp16, bf16, "
                                 "powersgd)", registry=True,
                                 strategies=("ddp",))
    powersgd_rank: int = knob(1, "ddp: PowerSGD matrix rank", check=at_least(1),
                              expected="an integer >= 1", strategies=("ddp",))
    bucket_cap_mb: float = knob(25.0, "ddp: gradient bucket size in MB", check=positive,
                                expected="a number > 0", strategies=("ddp",), resumable=True)
    local_sgd_steps: int = knob(1, "ddp: average parameters every k local steps (1 = plain ddp)",
                                check=at_least(1), expected="an integer >= 1", strategies=("ddp",))
    sync_batchnorm: bool = knob(False, "ddp: BatchNorm statistics over the global batch (all "
                                "workers, as local computes them) instead of each worker's shard",
                                strategies=("ddp",))
    shard_optimizer: bool = knob(False, "ddp: ZeRO-1, each worker keeps the optimizer state of its "
                                 "share of the parameters only (torch's ZeroRedundancyOptimizer)",
                                 strategies=("ddp",))
    # --- fsdp --------------------------------------------------------------------------------
    reshard_after_forward: bool = knob(True, "fsdp: free each block's gathered parameters after "
                                       "its forward and gather them again for the backward (ZeRO-3); "
                                       "false keeps them to the backward (ZeRO-2: more memory, "
                                       "less communication)", strategies=("fsdp",), resumable=True)
    fsdp_param_dtype: str = knob("float32", "fsdp: dtype of the parameters in the forward and "
                                 "backward (the gradients are reduced and the weights kept in "
                                 "float32)", choices=("float32", "bfloat16"), strategies=("fsdp",))
    cpu_offload: bool = knob(False, "fsdp: keep the sharded parameters, gradients and optimizer "
                             "state in CPU memory between uses (for a GPU run; on CPU it changes "
                             "nothing)", strategies=("fsdp",), resumable=True)
    # --- tp ----------------------------------------------------------------------------------
    tp_size: int | None = knob(None, "tp: workers per group splitting the model's layers; workers / "
                               "tp_size groups split each batch (default: workers, one group)",
                               check=at_least(1), expected="an integer >= 1", strategies=("tp",))
    # --- parameter server --------------------------------------------------------------------
    mode: str = knob("sync", "ps: apply averaged gradients (sync) or each as it comes (async)",
                     choices=("sync", "async"), strategies=("ps",))
    servers: int = knob(1, "ps: parameter-server actors, each owning part of the weights",
                        check=at_least(1), expected="an integer >= 1", strategies=("ps",))
    max_staleness: int = knob(4, "ps async: oldest gradient (in updates) that is still applied",
                              check=at_least(0), expected="an integer >= 0", strategies=("ps",))
    comm_dtype: str = knob("float32", "ps: dtype of gradients and weights on the wire",
                           choices=("float32", "float16", "bfloat16"), strategies=("ps",))
    # --- pipeline ----------------------------------------------------------------------------
    stages: int = knob(2, "pipeline: stage actors the model is cut into", check=at_least(1),
                       expected="an integer >= 1", strategies=("pipeline",))
    microbatches: int = knob(4, "pipeline: micro-batches per global batch", check=at_least(1),
                             expected="an integer >= 1", strategies=("pipeline",))
    schedule: str = knob("gpipe", "pipeline: micro-batch schedule",
                         registry=True,
                         strategies=("pipeline",))
    cuts: list[int] | None = knob(None, "pipeline: explicit block indices where stages start "
                                  "(default: balanced by parameter count)",
                                  check=lambda v: all(c >= 1 for c in v),
                                  expected="a list of integers >= 1", strategies=("pipeline",))
    virtual_stages: int | None = knob(None, "pipeline: chunks of blocks each stage actor holds "
                                      "(interleaved-1f1b; default: the schedule's own, 2 there, "
                                      "else 1); cuts then name where chunks start",
                                      check=at_least(1), expected="an integer >= 1",
                                      strategies=("pipeline",))
    replicas: int = knob(1, "pipeline: copies of the pipeline (DP x PP) that split each global "
                         "batch and sum their gradients per stage position", check=at_least(1),
                         expected="an integer >= 1", strategies=("pipeline",),
                         resumable=("pipeline",))
    timeline_step: int = knob(2, "pipeline: the global batch (counted from 1 over the run) whose "
                              "stage ops go to stage_events.json, the report's timeline; 0: none",
                              check=at_least(0), expected="an integer >= 0",
                              strategies=("pipeline",), resumable=True)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> RunSpec:
        """Build and validate; `source` (a file name) prefixes every error."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source or 'config'}: expected a mapping of field: value")
        where = f"{source}: " if source else ""
        raw = fold(raw)
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{where}unknown key '{key}'{closest(str(key), list(known))}")
            values[key] = coerce(key, value, known[key].type, where)
        spec = cls(**values)
        spec.validate(where)
        return spec

    def replace(self, **changes: Any) -> RunSpec:
        """This spec with `changes`; a new batch_size or batch_per_worker replaces the other."""
        for one, other in (("batch_size", "batch_per_worker"), ("batch_per_worker", "batch_size")):
            if changes.get(one) is not None:
                changes.setdefault(other, None)
        return RunSpec.from_dict({**self.to_dict(), **changes})

    def validate(self, where: str = "") -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                continue
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{where}{f.name}: got '{value}'{closest(value, list(meta['choices']))}"
                                  f"; expected one of {', '.join(meta['choices'])}")
            if meta["check"] and not meta["check"](value):
                raise ConfigError(f"{where}{f.name}: got {value!r}; expected {meta['expected']}")
            if meta["registry"]:
                registry = knobs.registry_of(f.name)
                name = value.split(":", 1)[0] if f.name == "data" else value
                # an import path (mypkg.nets:make) is imported and checked by the pre-flight
                own = f.name in ("model", "data") and is_import_path(value)
                if name not in registry and not own:
                    raise ConfigError(where + registry.unknown(value))
        if self.loss is not None and not is_import_path(self.loss):
            raise ConfigError(f"{where}loss: got '{self.loss}'; expected module.path:function")
        for name, broken, why in COMBINATIONS:
            if broken(self):
                raise ConfigError(f"{where}{name}: {why(self)}")
        if isinstance(self.workers, list) and self.strategy != "ddp":
            raise ConfigError(f"{where}workers: got {self.workers}; a range [min, max] (elastic "
                              f"scaling) needs strategy ddp, not '{self.strategy}'")
        if self.lr is None:
            self.lr = knobs.registry_of("optimizer")[self.optimizer].default_lr
        if self.batch_size is None and self.batch_per_worker is None:
            self.batch_size = DEFAULT_BATCH

    @property
    def min_workers(self) -> int:
        """The fewest replicas the run may have: `workers`, or the low end of its range."""
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        """The most replicas the run may have: `workers`, or the high end of its range."""
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    @property
    def tensor_parallel(self) -> int:
        """Workers of one tensor-parallel group: `tp_size`, by default all `workers`."""
        return self.tp_size if self.tp_size is not None else self.max_workers

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: `workers` where the strategy reads it (ddp, ps), a pipeline's
        `replicas` (its stages split the model, not the batch), tp's groups (workers /
        tp_size), else 1 (local)."""
        if reads(self.strategy, "tp_size"):
            return self.max_workers // self.tensor_parallel
        if reads(self.strategy, "workers"):
            return self.max_workers
        return self.replicas if reads(self.strategy, "replicas") else 1

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: batch_size, or batch_per_worker x replicas (gd trains on
        the whole set whatever this says: engine.global_batches)."""
        return self.batch_size if self.batch_size is not None else self.batch_per_worker * self.data_parallel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def refuse_unread(self) -> None:
        """A knob the chosen strategy never reads would be ignored silently (and would block a
        resume): refused, unless it keeps its default."""
        for f in fields(self):
            if not reads(self.strategy, f.name) and getattr(self, f.name) != default_of(f):
                readers = ", ".join(knobs.readers_of(f))
                raise ConfigError(f"{f.name}: read only by {readers}; this run's strategy is "
                                  f"{self.strategy}")
        for name, owner in knobs.OWNERS.items():  # model_args with a built-in model, ...
            why = knobs.unread_mapping(name, getattr(self, owner), getattr(self, name), KNOBS[owner])
            if why:
                raise ConfigError(why)

    def optimizer_hparams(self) -> dict[str, float]:
        return {"beta": self.beta, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}


def full_batch(optimizer: str) -> bool:
    """Whether `optimizer` (gd) steps on the whole training set, whatever the batch knobs say."""
    return knobs.registry_of("optimizer")[optimizer].full_batch


def reads(strategy: str, name: str) -> bool:
    """Whether a run of `strategy` reads the knob `name`."""
    return knobs.read_by(KNOBS[name], strategy)


def read_only(raw: dict[str, Any], strategy: str | None = None) -> dict[str, Any]:
    """`raw` (field: value) without the knobs its strategy (raw's own, else `strategy`, else
    the default) does not read: what a sweep hands each trial."""
    strategy = raw.get("strategy", strategy or RunSpec.strategy)
    return {k: v for k, v in raw.items() if k not in KNOBS or reads(strategy, k)}


# Settings valid one by one but not together: (the field the error names, test, what is wrong).
COMBINATIONS: tuple[tuple[str, Any, Any], ...] = (
    ("batch_per_worker", lambda s: s.batch_per_worker is not None and s.batch_size is not None,
     lambda s: f"got {s.batch_per_worker} with batch_size {s.batch_size}; give one of them: "
               "batch_size is the global batch, batch_per_worker x the data-parallel replicas makes it"),
    ("batch_per_worker", lambda s: s.batch_per_worker is not None and isinstance(s.workers, list),
     lambda s: f"got {s.batch_per_worker} with elastic workers {s.workers}; the global batch would "
               "change with the group's size: give batch_size instead"),
    ("lr_scaling", lambda s: s.lr_scaling != "none" and full_batch(s.optimizer),
     lambda s: f"got '{s.lr_scaling}' with optimizer {s.optimizer}, which steps on the whole training "
               "set whatever the batch; expected none"),
    ("grad_compression", lambda s: s.grad_compression == "powersgd" and s.max_workers == 1,
     lambda s: f"got 'powersgd' with workers {s.workers}; PowerSGD compresses the gradients "
               "workers exchange, so it needs workers >= 2"),
    ("tp_size", lambda s: reads(s.strategy, "tp_size") and s.max_workers % s.tensor_parallel,
     lambda s: f"got {s.tp_size} with workers {s.workers}; workers must divide by tp_size "
               "(workers = tp_size x data-parallel groups)"),
    ("local_sgd_steps", lambda s: s.local_sgd_steps > 1 and s.grad_compression != "none",
     lambda s: f"got {s.local_sgd_steps} with grad_compression '{s.grad_compression}'; local SGD "
               "exchanges parameters every k steps, no gradients to compress: set one of the two"),
    ("compile", lambda s: s.compile and not knobs.c_compiler(),
     lambda s: "got true, but no C++ compiler (cc, gcc, g++ or clang) is on PATH, and torch.compile "
               "builds its kernels with one: install one or set compile false"),
    ("shard_optimizer", lambda s: s.shard_optimizer and s.local_sgd_steps > 1,
     lambda s: f"got true with local_sgd_steps {s.local_sgd_steps}; local SGD's averager wraps the "
               "whole optimizer, ZeRO-1 shards it: set one of the two"),
    ("shard_optimizer", lambda s: s.shard_optimizer and knobs.unshardable(s.optimizer),
     lambda s: f"got true with optimizer {s.optimizer}, which {knobs.unshardable(s.optimizer)}; ZeRO-1 "
               "hands each worker's rule only unnamed tensors of its share: use another optimizer "
               "or shard_optimizer false"),
)

KNOBS: dict[str, dataclasses.Field] = {f.name: f for f in fields(RunSpec)}
