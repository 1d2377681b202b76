"""Bad input, all before any work: every mistake below, on the command line, in a --config or
sweep file, or in a data file, is exactly one line `error: ...` on stderr naming the field or file,
exit code 2, nothing on stdout and nothing written (no output folder, no report). Each case is
refused before Ray starts: in this process ray.init raises (the unit tier), so a case that got
as far as the capacity check, the pre-flight's last step, would fail here. A few cases also run
as the real `python -m raydist.cli` subprocess, end to end."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raydist.cli import main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
ADDRESSES = "host:port, ray://host:port, auto or local"
OPTIMIZERS = "gd, sgd, momentum, adagrad, rmsprop, adam, adamw, lars, muon, lamb, adafactor, lion, schedule-free-adamw"
ROOT = os.geteuid() == 0
AS_USER = pytest.mark.skipif(ROOT, reason="root writes into a read-only folder; the path under a file stands in")

# (name, the command line, the line the user reads after `error: `). {f} is the folder holding
# FILES, {out} an output folder that must not come to exist.
CASES = [
    # --- train: flags and --set ------------------------------------------------------------------
    pytest.param("train --lr -1 --out {out}", "lr: got -1.0; expected a number > 0", id="lr negative"),
    pytest.param("train --lr 1e308 --out {out}", "lr: got 1e+308, too large for float32 (at most 3.403e+38)", id="lr overflows float32"),
    pytest.param("train --set weight_decay=1e39 --out {out}", "weight_decay: got 1e+39, too large for float32 (at most 3.403e+38)", id="weight_decay overflows float32"),
    pytest.param("train --eps 1e-300 --out {out}", "eps: got 1e-300, too small for float32 (it rounds to 0; at least 1.401e-45)", id="eps underflows float32"),
    pytest.param("train --lr nan --out {out}", "lr: got 'nan'; expected a number", id="lr nan"),
    pytest.param("train --epochs 0 --out {out}", "epochs: got 0; expected an integer >= 1", id="epochs zero"),
    pytest.param("train --epochs -3 --out {out}", "epochs: got -3; expected an integer >= 1", id="epochs negative"),
    pytest.param("train --epochs two --out {out}", "epochs: got 'two'; expected an integer", id="epochs not an integer"),
    pytest.param("train --batch-size 0 --out {out}", "batch_size: got 0; expected an integer >= 1", id="batch size zero"),
    pytest.param("train --beta 1.5 --out {out}", "beta: got 1.5; expected a number in [0, 1)", id="beta out of range"),
    pytest.param("train --val-fraction 1 --out {out}", "val_fraction: got 1.0; expected a number in (0, 1)", id="val_fraction one"),
    pytest.param("train --seed 18446744073709551616 --out {out}", "seed: got 18446744073709551616; expected an integer from 0 to 4294967295", id="seed past 64 bits"),
    pytest.param("train --hidden 64,x --out {out}", "hidden: got '64,x'; expected a list of integers", id="hidden not integers"),
    pytest.param("train --use-gpu maybe --out {out}", "use_gpu: got 'maybe'; expected true or false", id="use_gpu not a bool"),
    pytest.param("train --strategy locale --out {out}", "strategy: unknown value 'locale' (did you mean 'local'?); expected one of local, ddp, ps, pipeline, fsdp, tp", id="unknown strategy"),
    pytest.param("train --set memory_per_worker=lots --out {out}", "memory_per_worker: got 'lots'; expected a size > 0 like 2GiB, 512MiB or 16GB", id="memory_per_worker not a size"),
    pytest.param("train --memory-per-worker 0GiB --out {out}", "memory_per_worker: got '0GiB'; expected a size > 0 like 2GiB, 512MiB or 16GB", id="memory_per_worker zero"),
    pytest.param("train --strategy ddp --workers 2 --set memory_per_worker=64KiB --out {out}", "memory_per_worker: ddp needs 75.2 KiB per worker (parameters, gradients and adam state), budget 64.0 KiB; fsdp, tp or pipeline shard it", id="ddp over the memory budget"),
    pytest.param("train --optimizer adamm --out {out}", f"optimizer: unknown value 'adamm' (did you mean 'adam'?); expected one of {OPTIMIZERS}", id="unknown optimizer"),
    pytest.param("train --model mlpp --out {out}", "model: unknown value 'mlpp' (did you mean 'mlp'?); expected one of mlp, cnn, transformer, gpt, resnet", id="unknown model"),
    pytest.param("train --data digit --out {out}", "data: unknown value 'digit' (did you mean 'digits'?); expected one of digits, synthetic, text, csv, parquet, images, parquet-dir, csv-dir", id="unknown data"),
    pytest.param("train --strategy pipeline --schedule 2f2b --out {out}", "schedule: unknown value '2f2b' (did you mean '1f1b'?); expected one of gpipe, 1f1b, interleaved-1f1b, zb-h1", id="unknown schedule"),
    pytest.param("train --bach-size 3 --out {out}", "unrecognized arguments: --bach-size 3", id="unknown flag"),
    pytest.param("train --out {out} --epochs", "argument --epochs: expected one argument", id="flag without its value"),
    pytest.param("train --set bach_size=3 --out {out}", "unknown key 'bach_size' (did you mean 'batch_size'?)", id="unknown --set key"),
    pytest.param("train --set lr --out {out}", "--set: got 'lr'; expected key=value", id="--set without ="),
    pytest.param("trian --epochs 1 --out {out}", "command: unknown value 'trian' (did you mean 'train'?); expected one of train, sweep, report, cluster, plan, ray", id="unknown command"),
    # --- train: cluster addresses (the knob, --address, RAY_ADDRESS) -----------------------------------
    pytest.param("train --strategy ddp --address not-a-host:xx --out {out}", f"address: got 'not-a-host:xx'; expected {ADDRESSES}", id="address port not a number"),
    pytest.param("train --strategy ddp --address headnode --out {out}", f"address: got 'headnode'; expected {ADDRESSES}", id="address without a port"),
    pytest.param("train --strategy ddp --address http://127.0.0.1:8265 --out {out}", f"address: got 'http://127.0.0.1:8265'; expected {ADDRESSES}", id="address the job server's"),
    pytest.param("train --strategy ddp --address ray://h:70000 --out {out}", f"address: got 'ray://h:70000'; expected {ADDRESSES}", id="address port out of range"),
    pytest.param("train --config {f}/address.yaml --out {out}", f"{{f}}/address.yaml: address: got 'head:'; expected {ADDRESSES}", id="config address malformed"),
    pytest.param("train --strategy ddp --out {out}", f"RAY_ADDRESS: got 'head:port'; expected {ADDRESSES}", id="RAY_ADDRESS malformed"),
    pytest.param("sweep {f}/sweep_ok.yaml --address 10.0.0.1 --out {out}", f"address: got '10.0.0.1'; expected {ADDRESSES}", id="sweep --address malformed"),
    pytest.param("sweep {f}/sweep_ok.yaml --out {out}", f"RAY_ADDRESS: got 'head:port'; expected {ADDRESSES}", id="sweep RAY_ADDRESS malformed"),
    pytest.param("cluster publish {f}/list.yaml --address 1.2.3.4:x", f"address: got '1.2.3.4:x'; expected {ADDRESSES}", id="cluster publish address malformed"),
    # --- train: mappings nothing would read ----------------------------------------------------
    pytest.param("train --model mlp --model-arg foo=1 --out {out}", "model_args: model 'mlp' is built in and takes no model_args (got foo); its own flags: --hidden", id="model_args for a built-in model"),
    pytest.param("train --model gpt --data text --set model_args.width=8 --out {out}", "model_args: model 'gpt' is built in and takes no model_args (got width); its own flags: --layers, --d-model, --heads, --seq-len, --tie-head", id="model_args for gpt"),
    pytest.param("train --data-arg path=x.npz --out {out}", "data_args: data 'digits' is built in and takes no data_args (got path); it has no flags of its own", id="data_args for digits"),
    pytest.param("train --data csv:{f}/ok.csv --data-arg sep=';' --out {out}", "data_args: data 'csv:{f}/ok.csv' is built in and takes no data_args (got sep); its own flags: --target", id="data_args for csv"),
    pytest.param("train --config {f}/mapping.yaml --out {out}", "data_args: data 'synthetic' is built in and takes no data_args (got rows, noise); its own flags: --samples", id="config data_args for synthetic"),
    pytest.param("sweep {f}/sweep_model_args.yaml --out {out}", "{f}/sweep_model_args.yaml: model_args: model 'mlp' is built in and takes no model_args (got width); its own flags: --hidden", id="sweep model_args searched for mlp"),
    pytest.param("sweep {f}/sweep_grid_models.yaml --out {out}", "{f}/sweep_grid_models.yaml: model_args: model 'cnn' is built in and takes no model_args (got depth); its own flags: --channels", id="sweep model_args with a built-in model in the grid"),
    pytest.param("sweep {f}/sweep_data_args.yaml --out {out}", "{f}/sweep_data_args.yaml: data_args: data 'images' is built in and takes no data_args (got size); its own flags: --samples", id="sweep data_args for images"),
    # --- train: --out -----------------------------------------------------------------------------
    pytest.param("train --out ''", "out: got ''; expected a non-empty string", id="out empty"),
    pytest.param("train --out {f}/afile", "out: {f}/afile is a file; expected a folder (created if missing)", id="out an existing file"),
    pytest.param("train --out {f}/afile/run", "out: cannot create {f}/afile/run: {f}/afile is a file", id="out under a file"),
    pytest.param("train --out {f}/locked/run", "out: {f}/locked/run cannot be created: {f}/locked is not writable", id="out under a read-only folder", marks=AS_USER),
    pytest.param("train --out {f}/locked", "out: {f}/locked is not writable", id="out a read-only folder", marks=AS_USER),
    # --- train: what the model, the data and the strategy need ----------------------------------
    pytest.param("train --hidden 10000000000000 --out {out}", "model: 'mlp' for data 'digits' needs more memory than this machine has (2.6e+15 bytes at once); make it smaller", id="hidden past memory"),
    pytest.param("train --data synthetic --samples 100000000000000 --out {out}", "data: 'synthetic' needs more memory than this machine has (3.2e+15 bytes at once); make it smaller", id="samples past memory"),
    pytest.param("train --model cnn --data synthetic --out {out}", "model: 'cnn' cannot take data 'synthetic' (features); it takes image", id="model cannot take the data"),
    pytest.param("train --model mlp --data text --out {out}", "model: 'mlp' cannot take data 'text' (tokens); it takes features", id="text needs a sequence model"),
    pytest.param("train --model transformer --data text --heads 3 --out {out}", "heads: 3 does not divide d_model 64", id="heads do not divide d_model"),
    pytest.param("train --strategy ddp --workers 3 --out {out}", "batch_size: got 64; the global batch must divide by workers (3), e.g. 63", id="ddp workers do not divide the batch"),
    pytest.param("train --strategy ddp --workers 5 --batch-size 5 --data csv:{f}/five.csv --out {out}", "workers: got 5, but the data has only 4 training samples; expected at most 4", id="ddp workers beyond the training rows"),
    pytest.param("train --strategy ps --workers 5 --batch-size 5 --data csv:{f}/five.csv --out {out}", "workers: 5 replicas but a global batch holds only 4 samples; expected workers <= 4", id="ps workers beyond the training rows"),
    pytest.param("train --strategy ps --servers 9 --out {out}", "servers: 9 parameter servers but the model has only 4 parameter tensors; expected servers <= 4", id="ps servers beyond the tensors"),
    pytest.param("train --strategy ps --workers 2-4 --out {out}", "workers: got [2, 4]; a range [min, max] (elastic scaling) needs strategy ddp, not 'ps'", id="ps given a range of workers"),
    pytest.param("train --strategy fsdp --workers 2 --batch-size 63 --out {out}", "batch_size: got 63; the global batch must divide by workers (2), e.g. 62", id="fsdp workers do not divide the batch"),
    pytest.param("train --strategy fsdp --workers 1-2 --out {out}", "workers: got [1, 2]; a range [min, max] (elastic scaling) needs strategy ddp, not 'fsdp'", id="fsdp given a range of workers"),
    pytest.param("train --strategy fsdp --fsdp-param-dtype float16 --out {out}", "fsdp_param_dtype: got 'float16' (did you mean 'bfloat16'?); expected one of float32, bfloat16", id="fsdp param dtype unknown"),
    pytest.param("train --strategy fsdp --reshard-after-forward maybe --out {out}", "reshard_after_forward: got 'maybe'; expected true or false", id="reshard_after_forward not a bool"),
    pytest.param("train --strategy fsdp --cpu-offload 2 --out {out}", "cpu_offload: got '2'; expected true or false", id="cpu_offload not a bool"),
    pytest.param("train --cpu-offload true --out {out}", "cpu_offload: read only by fsdp; this run's strategy is local", id="cpu_offload without fsdp"),
    pytest.param("train --strategy ddp --workers 2 --fsdp-param-dtype bfloat16 --out {out}", "fsdp_param_dtype: read only by fsdp; this run's strategy is ddp", id="fsdp_param_dtype with ddp"),
    pytest.param("train --strategy ddp --workers 2 --reshard-after-forward false --out {out}", "reshard_after_forward: read only by fsdp; this run's strategy is ddp", id="reshard_after_forward with ddp"),
    pytest.param("train --strategy fsdp --shard-optimizer true --out {out}", "shard_optimizer: read only by ddp; this run's strategy is fsdp", id="shard_optimizer with fsdp"),
    pytest.param("train --strategy ddp --workers 2 --shard-optimizer yes-please --out {out}", "shard_optimizer: got 'yes-please'; expected true or false", id="shard_optimizer not a bool"),
    pytest.param("train --strategy ddp --workers 2 --shard-optimizer true --optimizer muon --out {out}", "shard_optimizer: got true with optimizer muon, which tells its matrices apart by the parameters' names; ZeRO-1 hands each worker's rule only unnamed tensors of its share: use another optimizer or shard_optimizer false", id="shard_optimizer with muon"),
    pytest.param("train --strategy ddp --workers 2 --shard-optimizer true --optimizer schedule-free-adamw --out {out}", "shard_optimizer: got true with optimizer schedule-free-adamw, which switches every parameter between two sets of weights around an epoch; ZeRO-1 hands each worker's rule only unnamed tensors of its share: use another optimizer or shard_optimizer false", id="shard_optimizer with schedule-free"),
    pytest.param("train --strategy ddp --workers 2 --shard-optimizer true --local-sgd-steps 4 --out {out}", "shard_optimizer: got true with local_sgd_steps 4; local SGD's averager wraps the whole optimizer, ZeRO-1 shards it: set one of the two", id="shard_optimizer with local SGD"),
    pytest.param("train --strategy tp --workers 4 --tp-size 3 --out {out}", "tp_size: got 3 with workers 4; workers must divide by tp_size (workers = tp_size x data-parallel groups)", id="tp_size does not divide workers"),
    pytest.param("train --strategy tp --tp-size 0 --out {out}", "tp_size: got 0; expected an integer >= 1", id="tp_size zero"),
    pytest.param("train --tp-size 2 --out {out}", "tp_size: read only by tp; this run's strategy is local", id="tp_size without tp"),
    pytest.param("train --strategy tp --workers 2 --model cnn --out {out}", "model: tp cannot split 'cnn'; it splits mlp, gpt, transformer (a model needs a recipe in raydist/strategies/tp/parallelize.py)", id="tp of a model without a recipe"),
    pytest.param("train --strategy tp --workers 3 --model gpt --data text --text-chars 2000 --out {out}", "tp_size: got 3; the attention heads (4) are split over the tensor-parallel ranks, so heads must divide by tp_size", id="tp heads do not divide"),
    pytest.param("train --strategy tp --workers 2 --optimizer adafactor --out {out}", "optimizer: tp cannot run 'adafactor': its factored second moments reduce a split matrix in place, which DTensor does not support", id="tp with adafactor"),
    pytest.param("train --strategy tp --workers 4 --tp-size 2 --batch-size 63 --out {out}", "batch_size: got 63; the global batch must divide by the data-parallel groups (workers / tp_size = 2), e.g. 62", id="tp groups do not divide the batch"),
    pytest.param("train --strategy pipeline --stages 9 --out {out}", "stages: got 9, but model 'mlp' has only 2 blocks; expected at most 2", id="stages beyond the blocks"),
    pytest.param("train --strategy pipeline --microbatches 65 --out {out}", "microbatches: got 65, more than the global batch of 64 samples; expected at most 64", id="microbatches beyond the batch"),
    pytest.param("train --strategy pipeline --cuts 7 --out {out}", "cuts: got [7]; expected block indices from 1 to 1 (model 'mlp' has 2 blocks)", id="cut past the blocks"),
    # --- train: the training loop's levers -------------------------------------------------------
    pytest.param("train --clip-grad-norm 0 --out {out}", "clip_grad_norm: got 0.0; expected a number > 0", id="clip_grad_norm zero"),
    pytest.param("train --clip-grad-norm -1 --out {out}", "clip_grad_norm: got -1.0; expected a number > 0", id="clip_grad_norm negative"),
    pytest.param("train --grad-accum-steps 0 --out {out}", "grad_accum_steps: got 0; expected an integer >= 1", id="grad_accum_steps zero"),
    pytest.param("train --grad-accum-steps 65 --out {out}", "grad_accum_steps: got 65, but a worker's share of each global batch is 64 samples (64 over 1 data-parallel replica), and each micro-step needs one; expected at most 64", id="grad_accum_steps beyond the batch"),
    pytest.param("train --strategy ddp --workers 2 --grad-accum-steps 33 --out {out}", "grad_accum_steps: got 33, but a worker's share of each global batch is 32 samples (64 over 2 data-parallel replicas), and each micro-step needs one; expected at most 32", id="grad_accum_steps beyond a worker's share"),
    pytest.param("train --precision bf16 --out {out}", "precision: got 'bf16' (did you mean 'bf16-mixed'?); expected one of float32, bf16-mixed", id="precision unknown"),
    pytest.param("train --activation-checkpointing all --out {out}", "activation_checkpointing: got 'all'; expected one of none, blocks", id="activation_checkpointing unknown"),
    pytest.param("train --compile maybe --out {out}", "compile: got 'maybe'; expected true or false", id="compile not a bool"),
    pytest.param("train --strategy ps --workers 2 --grad-accum-steps 2 --out {out}", "grad_accum_steps: read only by local, ddp, fsdp, tp; this run's strategy is ps", id="grad_accum_steps with ps"),
    pytest.param("train --strategy pipeline --clip-grad-norm 1 --out {out}", "clip_grad_norm: read only by local, ddp, fsdp, tp; this run's strategy is pipeline", id="clip_grad_norm with pipeline"),
    pytest.param("train --strategy pipeline --compile true --out {out}", "compile: read only by local, ddp, fsdp, tp; this run's strategy is pipeline", id="compile with pipeline"),
    # --- --config files ---------------------------------------------------------------------------
    pytest.param("train --config {f}/nope.yaml --out {out}", "{f}/nope.yaml: no such file", id="config missing"),
    pytest.param("train --config {f}/folder.yaml --out {out}", "{f}/folder.yaml: is a directory; expected a YAML file", id="config a directory"),
    pytest.param("train --config {f}/broken.yaml --out {out}", "{f}/broken.yaml: not valid YAML (line 2)", id="config not YAML"),
    pytest.param("train --config {f}/latin1.yaml --out {out}", "{f}/latin1.yaml: not UTF-8 text (line 2); save it as UTF-8", id="config not UTF-8"),
    pytest.param("train --config {f}/list.yaml --out {out}", "{f}/list.yaml: expected a mapping of field: value at the top level, not a list", id="config a list"),
    pytest.param("train --config {f}/empty.yaml --out {out}", "{f}/empty.yaml: is empty; expected a mapping of field: value", id="config empty"),
    pytest.param("train --config {f}/twice.yaml --out {out}", "{f}/twice.yaml: duplicate key 'lr' (line 3)", id="config duplicate key"),
    pytest.param("train --config {f}/typo.yaml --out {out}", "{f}/typo.yaml: unknown key 'lrr' (did you mean 'lr'?)", id="config unknown key"),
    pytest.param("train --config {f}/negative.yaml --out {out}", "{f}/negative.yaml: epochs: got -3; expected an integer >= 1", id="config bad value"),
    pytest.param("train --config {f}/blank.yaml --out {out}", "{f}/blank.yaml: epochs: got nothing; expected an integer", id="config value left empty"),
    pytest.param("train --config {f}/huge.yaml --out {out}", "{f}/huge.yaml: lr: got 1e+308, too large for float32 (at most 3.403e+38)", id="config overflows float32"),
    # --- CSV / Parquet data files -----------------------------------------------------------------
    pytest.param("train --data csv --out {out}", "data: 'csv' needs a file: csv:PATH", id="csv without a path"),
    pytest.param("train --data csv:{f}/none.csv --out {out}", "{f}/none.csv: no such file", id="csv missing"),
    pytest.param("train --data csv:{f}/folder.csv --out {out}", "{f}/folder.csv: is a directory; expected a csv file", id="csv a directory"),
    pytest.param("train --data csv:{f}/empty.csv --out {out}", "{f}/empty.csv: the file is empty", id="csv empty"),
    pytest.param("train --data csv:{f}/header.csv --out {out}", "{f}/header.csv: the file has no data rows", id="csv header only"),
    pytest.param("train --data csv:{f}/one.csv --out {out}", "{f}/one.csv: needs at least 2 rows to split, has 1", id="csv one row"),
    pytest.param("train --data csv:{f}/ok.csv --target label --out {out}", "{f}/ok.csv: no target column 'label'; columns are a, b, y", id="csv without the target"),
    pytest.param("train --data csv:{f}/text.csv --out {out}", "{f}/text.csv: column 'a' is not numeric (row 2: 'x')", id="csv not numeric"),
    pytest.param("train --data csv:{f}/hole.csv --out {out}", "{f}/hole.csv: column 'b' has a missing or NaN value (row 1)", id="csv missing value"),
    pytest.param("train --data csv:{f}/nan.csv --out {out}", "{f}/nan.csv: column 'a' has a missing or NaN value (row 3)", id="csv with nan"),
    pytest.param("train --data csv:{f}/inf.csv --out {out}", "{f}/inf.csv: column 'b' has an infinite value (row 2: inf)", id="csv with inf"),
    pytest.param("train --data csv:{f}/huge.csv --out {out}", "{f}/huge.csv: column 'y' has a value too large for float32 (row 1: 1e+39)", id="csv beyond float32"),
    pytest.param("train --data csv:{f}/latin1.csv --out {out}", "{f}/latin1.csv: cannot be read as csv (UnicodeDecodeError)", id="csv not UTF-8"),
    pytest.param("train --data parquet:{f}/ok.csv --out {out}", "{f}/ok.csv: cannot be read as parquet (ArrowInvalid)", id="parquet not parquet"),
    # --- NPZ files through a user's loader (npzdata.py below) ----------------------------------
    pytest.param("train --data npzdata:load --data-arg path={f}/nan.npz --out {out}", "data: npzdata:load returned x with a NaN or infinite value (row 2)", id="npz with nan"),
    pytest.param("train --data npzdata:load --data-arg path={f}/inf.npz --out {out}", "data: npzdata:load returned x with a NaN or infinite value (row 4)", id="npz with inf"),
    pytest.param("train --data npzdata:load --data-arg path={f}/huge.npz --out {out}", "data: npzdata:load returned x with a value too large for float32 (row 1)", id="npz beyond float32"),
    pytest.param("train --data npzdata:load --data-arg path={f}/rows.npz --out {out}", "data: npzdata:load returned x with 6 rows and y with 5; expected as many", id="npz rows differ"),
    pytest.param("train --data npzdata:load --data-arg path={f}/none.npz --out {out}", "data: npzdata:load raised FileNotFoundError: [Errno 2] No such file or directory: '{f}/none.npz'", id="npz missing"),
    pytest.param("train --data npzdata:load --data-arg path={f}/folder.npz --out {out}", "data: npzdata:load raised IsADirectoryError: [Errno 21] Is a directory: '{f}/folder.npz'", id="npz a directory"),
    pytest.param("train --data npzdata:load --data-arg file={f}/ok.npz --out {out}", "data_args: npzdata:load takes no argument 'file' (it takes: path)", id="npz loader argument unknown"),
    pytest.param("train --strategy ddp --workers 6 --batch-size 6 --data npzdata:load --data-arg path={f}/ok.npz --out {out}", "workers: got 6, but the data has only 5 training samples; expected at most 5", id="npz workers beyond the rows"),
    # --- raydist sweep ----------------------------------------------------------------------------
    pytest.param("sweep {f}/nope.yaml --out {out}", "{f}/nope.yaml: no such file", id="sweep file missing"),
    pytest.param("sweep {f}/folder.yaml --out {out}", "{f}/folder.yaml: is a directory; expected a YAML file", id="sweep file a directory"),
    pytest.param("sweep {f}/latin1.yaml --out {out}", "{f}/latin1.yaml: not UTF-8 text (line 2); save it as UTF-8", id="sweep file not UTF-8"),
    pytest.param("sweep {f}/sweep_empty.yaml --out {out}", "{f}/sweep_empty.yaml: lr: grid expects a non-empty list of values", id="sweep grid empty"),
    pytest.param("sweep {f}/sweep_typo.yaml --out {out}", "{f}/sweep_typo.yaml: unknown key 'optimzer' (did you mean 'optimizer'?)", id="sweep leaf with a typo"),
    pytest.param("sweep {f}/sweep_huge.yaml --out {out}", "{f}/sweep_huge.yaml: lr: got 1e+39, too large for float32 (at most 3.403e+38)", id="sweep grid overflows float32"),
    pytest.param("sweep {f}/sweep_twice.yaml --out {out}", "{f}/sweep_twice.yaml: duplicate key 'metric' (line 4)", id="sweep duplicate key"),
    pytest.param("sweep {f}/sweep_seeds.yaml --out {out}", "{f}/sweep_seeds.yaml: seed: got 18446744073709551616; expected an integer from 0 to 4294967295", id="sweep seed past 64 bits"),
    pytest.param("sweep {f}/sweep_ok.yaml --out {f}/afile", "out: {f}/afile is a file; expected a folder (created if missing)", id="sweep out an existing file"),
    pytest.param("sweep {f}/sweep_ok.yaml --out {f}/afile/sweep", "out: cannot create {f}/afile/sweep: {f}/afile is a file", id="sweep out under a file"),
    pytest.param("sweep --out {out}", "sweep: give a sweep FILE (with --out DIR) or --resume DIR", id="sweep neither file nor resume"),
    pytest.param("sweep --resume {f}/folder.csv", "{f}/folder.csv: no sweep to resume (no sweep.yaml); start one with `raydist sweep FILE --out {f}/folder.csv`", id="sweep resume of no sweep"),
    # --- raydist report ---------------------------------------------------------------------------
    pytest.param("report {f}/folder.csv", "{f}/folder.csv: no results.csv; run `raydist sweep FILE --out {f}/folder.csv` first", id="report without results.csv"),
    pytest.param("report {f}/nowhere", "{f}/nowhere: no such folder", id="report of no folder"),
    pytest.param("report {f}/afile", "{f}/afile: is a file; expected a sweep's results folder (holding results.csv)", id="report of a file"),
    pytest.param("report {f}/results_empty", "{f}/results_empty/results.csv: holds no trials", id="report results.csv empty"),
    pytest.param("report {f}/results_binary", "{f}/results_binary/results.csv: cannot be read as CSV (UnicodeDecodeError)", id="report results.csv not CSV"),
    pytest.param("report {f}/results_empty --plan {f}/nowhere", "{f}/nowhere: no plan.csv; write one with `raydist plan ... --out DIR`", id="report plan missing"),
    # --- raydist plan -----------------------------------------------------------------------------
    pytest.param("plan --workers 0,x --out {out}", "workers: got '0,x'; expected worker counts like 1,2,4,8", id="plan worker counts"),
    pytest.param("plan --bandwidth fast --out {out}", "bandwidth: got 'fast'; expected a rate like 25Gbit/s or 3GB/s", id="plan bandwidth"),
    pytest.param("plan --latency soon --out {out}", "latency: got 'soon'; expected a time like 10us or 2ms", id="plan latency"),
    pytest.param("plan --flops lots --out {out}", "flops: got 'lots'; expected a rate like 2TFLOP/s or 2e12", id="plan flops"),
    pytest.param("plan --workers-per-node 0 --flops 1TFLOP/s --out {out}", "workers_per_node: got 0; expected an integer >= 1", id="plan workers per node"),
    pytest.param("plan --flops 1TFLOP/s --out {f}/afile", "out: {f}/afile is a file; expected a folder (created if missing)", id="plan out an existing file"),
    pytest.param("plan --model mlpp --out {out}", "model: unknown value 'mlpp' (did you mean 'mlp'?); expected one of mlp, cnn, transformer, gpt, resnet", id="plan unknown model"),
    # --- raydist ray start|stop|status ----------------------------------------------------------
    pytest.param("ray strat", "action: unknown value 'strat' (did you mean 'start'?); expected one of start, stop, status", id="ray unknown action"),
    # --- raydist cluster check (Ray's own schema errors: tests/test_cluster_yaml.py) -------------
    pytest.param("cluster chek {f}/list.yaml", "action: unknown value 'chek' (did you mean 'check'?); expected one of check, publish", id="cluster unknown action"),
    pytest.param("cluster check {f}/list.yaml", "{f}/list.yaml: expected a mapping of field: value at the top level, not a list", id="cluster file a list"),
    pytest.param("cluster check {f}/latin1.yaml", "{f}/latin1.yaml: not UTF-8 text (line 2); save it as UTF-8", id="cluster file not UTF-8"),
    pytest.param("cluster check {f}/cluster_twice.yaml", "{f}/cluster_twice.yaml: duplicate key 'max_workers' (line 3)", id="cluster file duplicate key"),
    pytest.param("cluster check {f}/folder.yaml", "{f}/folder.yaml: is a directory; expected a YAML file", id="cluster file a directory"),
]

# Run again as `python -m raydist.cli` (3 s each on an idle 2-core machine, 15 s under a load of
# 16): argparse's, a file's, a data file's, the report's, an address's and a mapping's refusal.
END_TO_END = ("unknown command", "config not UTF-8", "csv with inf", "report without results.csv",
              "address port not a number", "model_args for a built-in model")

FILES = {
    "afile": "not a folder\n",
    "broken.yaml": "lr: 0.1\n  epochs: [3\n",
    "latin1.yaml": b"lr: 0.1\noptimizer: adam # \xe9\n",
    "list.yaml": "- lr\n- 0.1\n",
    "empty.yaml": "",
    "twice.yaml": "epochs: 2\nlr: 0.1\nlr: 0.01\n",
    "typo.yaml": "lrr: 0.1\n",
    "negative.yaml": "epochs: -3\n",
    "blank.yaml": "epochs:\n",
    "huge.yaml": "lr: 1e308\n",
    "empty.csv": "",
    "header.csv": "a,b,y\n",
    "one.csv": "a,b,y\n1,2,0\n",
    "ok.csv": "a,b,y\n1,2,0\n3,4,1\n5,6,0\n",
    "five.csv": "a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,1,0\n",
    "text.csv": "a,b,y\n1,2,0\nx,4,1\n",
    "hole.csv": "a,b,y\n1,,0\n3,4,1\n",
    "nan.csv": "a,b,y\n1,2,0\n3,4,1\nnan,6,0\n",
    "inf.csv": "a,b,y\n1,2,0\n3,inf,1\n5,6,0\n",
    "huge.csv": "a,b,y\n1,2,1e39\n3,4,1.5\n5,6,0.5\n",
    "latin1.csv": b"a,b,y\n1,2,0\n3,4,\xe9\n",
    "npzdata.py": "import numpy as np\n\ndef load(path):\n    d = np.load(path)\n    return d['x'], d['y']\n",
    "sweep_ok.yaml": "epochs: 1\n",
    "sweep_empty.yaml": "epochs: 1\nlr: {grid: []}\n",
    "sweep_typo.yaml": "epochs: 1\noptimzer: {grid: [sgd, adam]}\n",
    "sweep_huge.yaml": "lr: {grid: [0.1, 1e39]}\n",
    "sweep_twice.yaml": "epochs: 1\nsweep:\n  metric: val_loss\n  metric: val_accuracy\n",
    "sweep_seeds.yaml": "sweep: {seeds: [0, 18446744073709551616]}\n",
    "cluster_twice.yaml": "cluster_name: x\nmax_workers: 2\nmax_workers: 3\n",
    "address.yaml": "strategy: ddp\naddress: 'head:'\n",
    "mapping.yaml": "data: synthetic\ndata_args: {rows: 10, noise: 0.1}\n",
    "sweep_model_args.yaml": "epochs: 1\nmodel_args: {width: {grid: [8, 16]}}\n",
    "sweep_grid_models.yaml": "epochs: 1\nmodel: {grid: [resmlp:make_model, cnn]}\nmodel_args.depth: 2\n",
    "sweep_data_args.yaml": "epochs: 1\nmodel: cnn\ndata: images\ndata_args: {size: 32}\n",
    "results_empty/results.csv": "",
    "results_binary/results.csv": b"\x89PNG\r\n\x1a\n\x00\xff\xfe,\x00\n",
}
FOLDERS = ("folder.yaml", "folder.csv", "folder.npz", "locked")


def npz_files(f: Path) -> None:
    """x (6, 3) float32 and y classes, then each file with one thing wrong."""
    x = np.arange(18, dtype=np.float32).reshape(6, 3) / 18
    y = np.array([0, 1, 0, 1, 0, 1])
    np.savez(f / "ok.npz", x=x, y=y)
    np.savez(f / "nan.npz", x=np.where(np.arange(6)[:, None] == 2, np.nan, x), y=y)
    np.savez(f / "inf.npz", x=np.where(np.arange(6)[:, None] == 4, np.inf, x), y=y)
    np.savez(f / "huge.npz", x=x.astype(np.float64) * np.array([1, 1e300, 1, 1, 1, 1])[:, None], y=y)
    np.savez(f / "rows.npz", x=x, y=y[:5])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("bad_input")
    for name, content in FILES.items():
        (f / name).parent.mkdir(exist_ok=True)
        (f / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for name in FOLDERS:
        (f / name).mkdir()
    (f / "locked").chmod(0o500)
    npz_files(f)
    return f


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def command(case: str, files: Path, out: Path) -> list[str]:
    return shlex.split(case.replace("{f}", str(files)).replace("{out}", str(out)))


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,message", CASES)
def test_refused_in_one_line_before_any_work(case, message, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default folder (results/...) would show up here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if "RAY_ADDRESS" in message:  # the cases about the environment's address
        monkeypatch.setenv("RAY_ADDRESS", "head:port")
    monkeypatch.syspath_prepend(str(files))  # npzdata
    before = tree(files)
    assert exit_code(command(case, files, tmp_path / "out")) == 2
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", f"error: {message.replace('{f}', str(files))}\n")
    assert list(tmp_path.iterdir()) == [] and tree(files) == before


@pytest.mark.parametrize("name", END_TO_END)
def test_refused_in_one_line_by_the_real_cli(name, files, tmp_path):
    [(case, message)] = [p.values for p in CASES if p.id == name]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(files), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "raydist.cli", *command(case, files, tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {message.replace('{f}', str(files))}\n"
    assert list(tmp_path.iterdir()) == []


NOBODY = [  # (command line, the field the line names); {port}: a port of this machine nobody serves
    ("train --strategy ddp --address 127.0.0.1:{port} --out {out}", "address", "127.0.0.1:{port}"),
    ("train --strategy ps --out {out}", "RAY_ADDRESS", "127.0.0.1:{port}"),
    ("sweep {f}/sweep_ok.yaml --address ray://127.0.0.1:{port} --out {out}", "address", "ray://127.0.0.1:{port}"),
]


@pytest.mark.timeout(60)  # a bounded guard: the probe gives up within PROBE_S (10 s)
@pytest.mark.parametrize("case,field,address", NOBODY, ids=["--address", "RAY_ADDRESS", "sweep ray://"])
def test_an_address_where_nothing_answers_is_one_line(case, field, address, files, tmp_path,
                                                      monkeypatch, capsys):
    """Well-formed, but no cluster there: one line naming the field, exit code 1 (not the user's
    typo), nothing written; ray.init, which would retry for minutes, is never reached (it raises
    in the unit tier)."""
    from raydist.runtime.connect import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    address = address.format(port=port)
    if field == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert exit_code(command(case.replace("{port}", str(port)), files, tmp_path / "out")) == 1
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", f"error: {field}: nothing answers at {address} (connection "
                                          "refused; raydist waits up to 10 s); is a Ray cluster running there?\n")
    assert list(tmp_path.iterdir()) == []


def test_compile_without_a_compiler_is_one_line(files, tmp_path, monkeypatch, capsys):
    """compile needs a C++ compiler for torch.compile's CPU kernels: none on PATH, one line."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert exit_code(command("train --compile true --out {out}", files, tmp_path / "out")) == 2
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", "error: compile: got true, but no C++ compiler (cc, gcc, g++ "
                                          "or clang) is on PATH, and torch.compile builds its kernels with "
                                          "one: install one or set compile false\n")
    assert list(tmp_path.iterdir()) == []
