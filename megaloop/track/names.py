"""Tracking's vocabulary: every MLflow tag and metric name megaloop writes or reads, in one table.
The trainer, the sweeps and the fits speak in these names; only track/ talks to MLflow."""

from __future__ import annotations


class Tag:
    """Tags of megaloop's MLflow runs (and one of experiments: BORROW)."""

    STATUS = "megaloop.status"  # running | finished | failed | killed | superseded
    CONFIG_HASH = "megaloop.config_hash"
    CONTINUES = "megaloop.continues"  # a continuation run: the run it continues
    CONTINUED_IN = "megaloop.continued_in"  # a superseded run: the run that continues it
    RESUMES = "megaloop.resumes"
    RESUMED_AT_STEP = "megaloop.resumed_at_step"
    CHANGES = "megaloop.changes"  # the accepted changes of a resume
    WORLD_SIZE = "megaloop.world_size"
    HOST = "megaloop.host"
    GIT_COMMIT = "megaloop.git_commit"
    GIT_DIRTY = "megaloop.git_dirty"
    VERSION = "megaloop.version."  # + megaloop, torch, deepspeed, mlflow, python
    KIND = "megaloop.kind"  # "fit" on the runs that hold fits, not training
    BORROW = "megaloop.borrow"  # an experiment's: the runs of others that its fit also takes
    # what the training machine resolved
    PEAK_FLOPS = "megaloop.peak_flops"
    PEAK_FLOPS_SOURCE = "megaloop.peak_flops_source"
    HOST_ALLOCATOR = "megaloop.host_allocator"
    DEVICE = "megaloop.device"
    PRECISION = "megaloop.precision"
    MATMUL_PRECISION = "megaloop.matmul_precision"
    CHECKPOINT_DIR = "megaloop.checkpoint_dir"
    # a fit run's
    FIT_AGAINST = "megaloop.fit.against"
    FIT_EXPERIMENT = "megaloop.fit.experiment"
    FIT_N_RUNS = "megaloop.fit.n_runs"
    FIT_RUN_IDS = "megaloop.fit.run_ids"
    FIT_SKIPPED_RUNS = "megaloop.fit.skipped_runs"


class Metric:
    """Metrics of a training run."""

    TRAIN_LOSS = "train/loss"
    LR = "train/lr"
    GRAD_NORM = "train/grad_norm"
    TOKENS_PER_S = "train/tokens_per_s"
    MFU = "train/mfu"  # attention counted in full (the papers' FLOPs, PaLM's MFU)
    MFU_CAUSAL = "train/mfu_causal"  # attention counted causally
    PEAK_MEM_GIB = "train/peak_mem_gib"  # allocated; on the CPU the peak RSS
    PEAK_MEM_RESERVED_GIB = "train/peak_mem_reserved_gib"  # a GPU's caching allocator
    RECURRENCES = "train/recurrences"
    TOKENS_SEEN = "train/tokens_seen"
    FLOPS_SEEN = "train/flops_seen"
    VAL_LOSS = "val/loss"
    VAL_BPB = "val/bpb"
