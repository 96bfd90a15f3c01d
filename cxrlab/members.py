"""Ensembles trained in one command: `cxrlab train --members K [--parallel P]`.

K models of one configuration, member i seeded `seed + 1000 i`, all on the same validation carve (so that the
ensemble's temperature is fitted on images none of them trained on), each in OUT/member{i}/ as an ordinary run;
their probability average (`cxrlab.ensemble`) is calibrated on that carve and written as OUT/best.pt, usable
wherever a checkpoint is, and evaluated once on the test split when there is one (OUT/metrics.json, report).
With `--time-budget-min B` the budget covers the training of all members: one after another each gets B/K, P side
by side P*B/K. `--parallel P` trains P members at once in their own processes (the images decoded into the cache
once beforehand, CPU threads split between them, one GPU each, round robin, when there are several): on a GPU, where
one batch-32 run leaves the device mostly idle, five members train in about the time of two; on a 2-core CPU they
train no faster in total than one after another (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from cxrlab.config import TrainConfig
from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

SEED_STEP = 1000  # member i trains with seed + SEED_STEP * i
STATE = "members.json"  # the ensemble folder's record: settings and each finished member
PARALLEL_NEEDS_MEMBERS = "--parallel trains ensemble members side by side; give --members K (K > 1) as well"


def member_configs(cfg: TrainConfig, members: int, parallel: int = 1) -> list[TrainConfig]:
    """The TrainConfig of each member: `cfg` with its own seed and folder, the validation carve of `cfg`, and its
    share of the time budget (`cfg.time_budget_min` / the rounds of `parallel` members needed for all of them).

    Args:
        cfg: the ensemble's configuration (its `out` is the ensemble's folder).
        members: K >= 2.
        parallel: members trained at once (1..K).

    Returns:
        K configs, member i in out/member{i} with seed cfg.seed + 1000 i and split_seed cfg.carve_seed.
    """
    check_members(members, parallel)
    rounds = -(-members // min(parallel, members))
    budget = cfg.time_budget_min / rounds if cfg.time_budget_min else cfg.time_budget_min
    return [dataclasses.replace(cfg, seed=cfg.seed + SEED_STEP * i, split_seed=cfg.carve_seed,
                                out=str(Path(cfg.out) / f"member{i}"), time_budget_min=budget)
            for i in range(members)]


def check_members(members: int, parallel: int) -> None:
    """Refuse member counts that make no ensemble, naming the fix."""
    if members < 2:
        raise CxrlabError(f"--members {members}: an ensemble needs at least 2 members (without --members, one model)")
    if parallel < 1:
        raise CxrlabError(f"--parallel {parallel}: give the number of members to train at once (1 to {members})")


def fit_members(cfg: TrainConfig, members: int, parallel: int = 1, resume: bool = False, progress: bool = True) -> dict:
    """Train the members (skipping, with `resume`, those already finished and continuing those with a last.pt),
    average them into out/best.pt calibrated on their shared validation carve, and test it once.

    Args:
        cfg: the ensemble's configuration.
        members: K.
        parallel: members trained at once.
        resume: continue an interrupted ensemble in `cfg.out`.
        progress: progress bars (one member at a time only).

    Returns:
        {"run_dir", "members": [each member's seed, folder (in run_dir), best epoch and test metrics],
        "test": the ensemble's test metrics (absent without a test split)}.
    """
    from cxrlab.config import save_yaml
    from cxrlab.train import attach_log_file, detach_log_file

    out = Path(cfg.out)
    cfgs = member_configs(cfg, members, parallel)
    state = load_state(out) if resume else {}
    if state.get("members", members) != members:
        raise CxrlabError(f"--resume: {out} holds an ensemble of {state['members']} members, not {members}; give "
                          f"--members {state['members']} or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    handler = attach_log_file(out / "train.log")  # the whole command's log; each member's own is in memberI/
    try:
        result, state = _fit(cfgs, out, state, parallel, resume, progress)
    finally:
        detach_log_file(handler)
    finished = sorted(state["finished"], key=lambda r: r["member"])
    summary, state = {"run_dir": str(out), "members": finished}, {**state, "finished": finished}
    if result:  # a test split: the ensemble's numbers beside its members'
        summary["test"] = result
        state["ensemble"] = {k: result[k] for k in ("accuracy", "macro_f1", "auc_macro", "n")}
    write_state(out, state)
    return summary


def _fit(cfgs: list[TrainConfig], out: Path, state: dict, parallel: int, resume: bool,
         progress: bool) -> tuple[dict, dict]:
    """Train the unfinished members and average all of them: (the ensemble's test metrics, members.json state)."""
    members = len(cfgs)
    done = {r["member"]: r for r in state.get("finished", [])}
    todo = [i for i in range(members) if i not in done]
    log.info("ensemble of %d members in %s (seeds %s, validation carve of seed %d, %d at a time)%s", members, out,
             ", ".join(str(c.seed) for c in cfgs), cfgs[0].split_seed, parallel,
             f"; --resume: member(s) {', '.join(map(str, sorted(done)))} already finished" if done else "")
    state = {"members": members, "parallel": parallel, "finished": list(done.values())}
    write_state(out, state)
    for i, result in train_members([cfgs[i] for i in todo], parallel, resume, progress, todo):
        state["finished"].append(member_record(i, cfgs[i], result))
        write_state(out, state)
        log.info("member %d finished (%s)%s", i, cfgs[i].out, _test_text(result.get("test")))
    result = ensemble_members(cfgs, out)
    if result:
        log.info("ensemble%s (n=%d)", _test_text(result), result["n"])
    return result, state


def _test_text(test: dict | None) -> str:
    from cxrlab.metrics import format_metric

    return f": test accuracy {test['accuracy']:.4f}, AUC {format_metric(test['auc_macro'])}" if test else ""


def member_record(i: int, cfg: TrainConfig, result: dict) -> dict:
    test = result.get("test") or {}
    return {"member": i, "seed": cfg.seed, "folder": Path(cfg.out).name, "best_epoch": result.get("best_epoch"),
            **{k: test[k] for k in ("accuracy", "macro_f1", "auc_macro") if k in test}}


def load_state(out: Path) -> dict:
    path = out / STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"'{path}' is not the ensemble record cxrlab writes ({exc}); restore it, or train into a "
                          f"new --out") from None
    if not isinstance(state, dict):
        raise CxrlabError(f"'{path}' is not the ensemble record cxrlab writes (a JSON object); restore it, or train "
                          f"into a new --out")
    return state


def write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / STATE)


def train_members(cfgs: list[TrainConfig], parallel: int, resume: bool = False, progress: bool = True,
                  ids: list[int] | None = None):
    """Yield (member id, fit result) as each member finishes; with parallel > 1 in that many spawned processes at
    once. A member resumes from its last.pt when `resume` and it has one. A member that fails stops the run (the
    finished ones stay recorded)."""
    from cxrlab.train import fit

    ids = list(range(len(cfgs))) if ids is None else ids
    jobs = [(c, resume and (Path(c.out) / "last.pt").is_file()) for c in cfgs]
    parallel = min(parallel, len(cfgs))
    if parallel <= 1:
        for i, (c, again) in zip(ids, jobs):
            log.info("member %d: seed %d -> %s%s", i, c.seed, c.out, " (resumed)" if again else "")
            yield i, fit(c, resume=again, progress=progress)
        return
    yield from _train_side_by_side(jobs, ids, parallel)


def _train_side_by_side(jobs: list[tuple[TrainConfig, bool]], ids: list[int], parallel: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    # the user's OMP_NUM_THREADS wins; else the cores are split between the members
    first = jobs[0][0]
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // parallel)
    gpus = torch.cuda.device_count() if first.device == "auto" else 0  # NVML: no CUDA context here
    if not gpus and first.device in ("auto", "cpu"):
        log.warning("--parallel %d without a GPU: the members share this CPU's %s cores; on a 2-core CPU they trained "
                    "no faster in total than one after another (docs/BENCHMARKS.md)", parallel, os.cpu_count())
    jobs = [(dataclasses.replace(c, workers=threads), again) for c, again in jobs]
    warm_cache(first)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_member_process,
                             initargs=(threads, gpus, ctx.Value("i", 0))) as pool:
        futures = {pool.submit(_fit_quietly, c, again): i for i, (c, again) in zip(ids, jobs)}
        for f in as_completed(futures):
            yield futures[f], f.result()


def _fit_quietly(cfg: TrainConfig, resume: bool) -> dict:
    from cxrlab.train import fit

    return fit(cfg, resume=resume, progress=False)


def warm_cache(cfg: TrainConfig) -> None:
    """Decode every image of the run's data once into the cache, so that members started together read it
    instead of decoding the same files side by side."""
    from cxrlab.data.cache import load_arrays
    from cxrlab.train import data_index
    from cxrlab.training_setup import resolve_preprocess

    if not cfg.cache:
        return
    index = data_index(cfg)
    paths = [s.path for samples in index.splits.values() for s in samples]
    load_arrays(paths, resolve_preprocess(cfg), cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                workers=min(os.cpu_count() or 1, 8))


def worker_gpu(worker: int, gpus: int, visible: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES of side-by-side worker `worker` (0, 1, ...): one GPU each, round robin over the
    `gpus` visible ones (named by `visible`, the parent's CUDA_VISIBLE_DEVICES, when set); None (all, unchanged)
    with fewer than two GPUs."""
    if gpus < 2:
        return None
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(gpus)]
    return names[worker % min(gpus, len(names))]


def _member_process(threads: int, gpus: int, counter) -> None:
    with counter.get_lock():
        worker, counter.value = counter.value, counter.value + 1
    gpu = worker_gpu(worker, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch is imported here: this worker's cuda:0
    import torch

    from cxrlab.cli import setup_logging

    torch.set_num_threads(threads)
    setup_logging(quiet=True)  # members side by side: warnings only on the console, INFO in each train.log


def ensemble_members(cfgs: list[TrainConfig], out: Path) -> dict:
    """Average the members' best.pt into out/best.pt, fit its temperature (and --target-recall thresholds) on their
    shared validation carve and evaluate it once on the test split when there is one (out/metrics.json, the evaluate
    schema, per source with a manifest); returns those test metrics, {} without a test split."""
    import torch

    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble
    from cxrlab.evaluate import evaluate_checkpoint, label_indices
    from cxrlab.finalize import calibrate_checkpoint
    from cxrlab.inference import bundle_for
    from cxrlab.train import data_index

    cfg = cfgs[0]
    device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    ckpt = build_ensemble([Path(c.out) / "best.pt" for c in cfgs])
    index = data_index(cfg)
    val = index.splits["val"]
    logits, ok, _ = bundle_for(ckpt, device).logits_for_files([s.path for s in val])
    ckpt = calibrate_checkpoint(ckpt, logits, label_indices([val[i] for i in ok], list(ckpt["class_names"])),
                                cfg.target_recall, cfg.calibrate)
    ckpt["calibration_fitted_on"] = f"the members' validation carve ({len(ok)} images)"
    ckpt["config"] = {**dataclasses.asdict(cfg), "out": str(out), "members": len(cfgs)}  # member 0's settings
    save_checkpoint(ckpt, out / "best.pt")
    log.info("ensemble of %d members -> %s (temperature fitted on %d validation images)", len(cfgs), out / "best.pt",
             len(ok))
    if not index.splits.get("test"):
        return {}
    has_source = any(s.source for s in index.splits["test"])
    return evaluate_checkpoint(out / "best.pt", cfg.data, out, split="test", manifest=cfg.manifest,
                               group_by="source" if has_source else None, device=device, report=cfg.report)
