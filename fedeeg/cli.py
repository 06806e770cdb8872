"""The ``fedeeg`` command line: ``simulate``, ``evaluate`` and ``pretrain``."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="FedEEG: federated LoRA adaptation of EEG foundation models across hospitals.",
)
console = Console(stderr=True)
logger = logging.getLogger("fedeeg")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        # Logs go to stderr, so that --json output on stdout stays parseable.
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("fedeeg").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("mne", "flwr", "ray", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        import mne
    except ImportError:  # a run from an eegmat window pack or synthetic data needs no MNE
        return
    mne.set_log_level("INFO" if verbose else "ERROR")
    # MNE prints through its own handler to stdout; send its records through ours (stderr) instead.
    mne_logger = logging.getLogger("mne")
    for handler in list(mne_logger.handlers):
        mne_logger.removeHandler(handler)
    mne_logger.propagate = True


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    console.print(f"[bold red]Error:[/] {exc}")
    raise typer.Exit(code=2)


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _set_engine(engine: str | None, debug: bool) -> None:
    """Validate --engine and pass it on through $FEDEEG_ENGINE (to this run and to a sweep's cells)."""
    if engine is None:
        return
    from .federation.simulation import ENGINES

    if engine not in ENGINES:
        _fail(ValueError(f"Invalid value for --engine. Allowed values are {', '.join(map(repr, ENGINES))}, but got "
                         f"{engine!r} instead."), debug)
    os.environ["FEDEEG_ENGINE"] = engine


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedeeg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")) -> None:
    """FedEEG command line."""


@app.command()
def simulate(
    ctx: typer.Context,
    scenario: str = typer.Option("", "--scenario", help="A named scenario (simulations/scenarios/NAME.toml) or a scenario "
                                 "TOML path; its values are defaults that the options given explicitly here override."),
    dataset: str = typer.Option("synthetic", help="synthetic | eegmat | folder (recordings described by --site files)."),
    data_dir: str = typer.Option("", "--data-dir", help="Folder of the eegmat EDF files and subject-info.csv."),
    sites: int = typer.Option(3, help="Number of sites (synthetic, or eegmat with --split subject)."),
    site: list[str] = typer.Option([], "--site", help="--dataset folder: a site's TOML file (once per site)."),
    labels: str = typer.Option("", "--labels", help="--dataset folder: the federation's classes, comma-separated (e.g. left,right)."),
    channels: str = typer.Option("", "--channels", help="Channels every site's windows hold, comma-separated (default: each site's own)."),
    max_interpolated: int = typer.Option(0, "--max-interpolated", help="Most missing channels a recording may have interpolated."),
    cache_dir: str = typer.Option("", "--cache-dir", help="Preprocessed-window cache (default $FEDEEG_CACHE_DIR or ~/.cache/fedeeg; 'off': none)."),
    reference: str = typer.Option("", "--reference", help="Re-reference recordings: '' (keep) | average."),
    reject_uv: float = typer.Option(0.0, "--reject-uv", help="Drop windows above this peak-to-peak amplitude (µV; 0: keep all)."),
    split: str = typer.Option("year", help="eegmat: year (3 sites by recording year) | subject (round-robin)."),
    test_fraction: float = typer.Option(0.34, "--test-fraction", help="Fraction of subjects held out inside every site."),
    mode: str = typer.Option("federated", help="federated | centralized | local (same model, same budget)."),
    strategy: str = typer.Option("fedit", help="ffa (LoRA, A frozen: exact) | fedit (LoRA A and B averaged) | rolora (LoRA B and A trained in alternate rounds: exact) | full (full fine-tuning) | head (frozen backbone, only the head trains: a linear probe)."),
    rounds: int = typer.Option(10, help="Federated rounds (centralized/local: blocks of --local-epochs)."),
    local_epochs: int = typer.Option(2, "--local-epochs", help="Local epochs per round."),
    lora_rank: int = typer.Option(2, "--lora-rank", help="LoRA rank of qkv and MLP."),
    lora_preset: str = typer.Option("paper", "--lora-preset", help="paper | attention | all-linear | qkv | mlp | convs | qkv+convs | mlp+convs (the seed study's target subsets)."),
    conv_rank: int = typer.Option(4, "--conv-rank", help="LoRA rank of the temporal convs (paper preset; 0 = none)."),
    backbone: str = typer.Option("labram-small", help="labram-small | labram-base | labram-large | labram-huge (LoRA); "
                                 "eegnet | eeg-inception | cbramod (baselines, --strategy full)."),
    checkpoint: str = typer.Option("", help="Backbone checkpoint (official LaBraM .pth, state dict or .safetensors; "
                                   "`fedeeg pretrain` writes one)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: ffa 1e-2, fedit 5e-3, full 5e-4, head 5e-3)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    window_seconds: float = typer.Option(4.0, "--window-seconds", help="Window length in 1-s patches."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    compile: str = typer.Option("off", "--compile", help="torch.compile the model where sites train on CUDA: off | on | reduce-overhead | max-autotune-no-cudagraphs (costs about a minute per site; pays for long GPU training)."),
    seed: int = typer.Option(0, help="Seed of the backbone init, LoRA A, the subject split and training."),
    secure: bool = typer.Option(False, "--secure", help="Secure aggregation: the server only learns the sum of the sites' updates."),
    clip: float = typer.Option(0.0, "--clip", help="L2 bound of a site's update per round (0: none; --secure then uses 100)."),
    dp_sigma: float = typer.Option(0.0, "--dp-sigma", help="Distributed DP noise multiplier: the secure sum carries noise of std dp-sigma x clip (needs --secure)."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="Delta of the reported (epsilon, delta)-DP."),
    secagg_threshold: float = typer.Option(0.6, "--secagg-threshold", help="Shamir threshold: fraction in (0.5, 1) of each site's share holders, or a whole count."),
    secagg_neighbours: int = typer.Option(0, "--secagg-neighbours", help="Masking neighbours per site (0: all other sites up to 10, then ~3 log2 n)."),
    secagg_weight_cap: int = typer.Option(10000, "--secagg-weight-cap", help="Training windows at which a site's weight in the secure mean stops growing."),
    quant_scale: float = typer.Option(0.0, "--quant-scale", help="Fixed-point scale of secure updates (0: the largest safe one)."),
    aggregation: str = typer.Option("mean", "--aggregation", help="mean | median | trimmed-mean (robust rules: not with --secure)."),
    fail_sites: int = typer.Option(0, "--fail-sites", help="Simulation: the first N sites fail every round (dropout testing and demos)."),
    fail_at: str = typer.Option("train", "--fail-at", help="Where they fail: train | upload | unmask (unmask needs --secure)."),
    reply_timeout: float = typer.Option(0.0, "--reply-timeout", help="Seconds to wait for the sites' replies (0: wait for all)."),
    evaluate_every: int = typer.Option(1, "--evaluate-every", help="Federated: the sites evaluate the global model every N rounds and after the last (1: every round)."),
    evaluate_in: str = typer.Option("next-train", "--evaluate-in", help="Federated: next-train (the sites evaluate a round's global model with the next round's training message: one exchange per round) | separate (an evaluate message of its own)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Federated simulation engine: ray (Flower's, sites in parallel actors; the default) | inprocess (sites answer in turn in this process: one GPU, short runs). Default: $FEDEEG_ENGINE, else ray."),
    out: str = typer.Option("", help="Output folder (default runs/DATASET-MODE-STRATEGY-sSEED)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower, Ray and MNE logs."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run N sites on this machine (federated in Flower's simulation engine) and write OUT/."""
    _setup_logging(verbose)
    _set_engine(engine, debug)
    if scenario:
        _simulate_scenario(ctx, scenario, verbose, debug)
        return
    try:
        from .config import RunConfig

        out = out or f"runs/{dataset}-{mode}-{strategy}-s{seed}"
        cfg = RunConfig(dataset=dataset, data_dir=data_dir, sites=sites, site_files=",".join(site), labels=labels,
                        channels=channels, max_interpolated=max_interpolated, cache_dir=cache_dir,
                        reference=reference, reject_uv=reject_uv,
                        split=split, test_fraction=test_fraction,
                        mode=mode, strategy=strategy, rounds=rounds, local_epochs=local_epochs, backbone=backbone,
                        checkpoint=checkpoint, lora_preset=lora_preset, lora_rank=lora_rank, conv_rank=conv_rank,
                        lr=lr, batch_size=batch_size, window_seconds=window_seconds, device=device, compile=compile, seed=seed, out=out,
                        secure=secure, clip=clip, dp_sigma=dp_sigma, dp_delta=dp_delta, secagg_threshold=secagg_threshold,
                        secagg_neighbours=secagg_neighbours, secagg_weight_cap=secagg_weight_cap, quant_scale=quant_scale,
                        aggregation=aggregation, fail_sites=fail_sites, fail_at=fail_at, reply_timeout=reply_timeout,
                        evaluate_every=evaluate_every, evaluate_in=evaluate_in)
        if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file.")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(exc, debug)
    try:
        _run_simulate(cfg, verbose)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        _fail(exc, debug)


#: `fedeeg simulate` options -> RunConfig fields (for --scenario: the options given explicitly override the scenario).
_SIMULATE_FIELDS = {"dataset": "dataset", "data_dir": "data_dir", "sites": "sites", "site": "site_files", "labels": "labels",
                    "channels": "channels", "max_interpolated": "max_interpolated", "cache_dir": "cache_dir", "reference": "reference", "reject_uv": "reject_uv",
                    "split": "split", "test_fraction": "test_fraction", "mode": "mode", "strategy": "strategy",
                    "rounds": "rounds", "local_epochs": "local_epochs", "lora_rank": "lora_rank",
                    "lora_preset": "lora_preset", "conv_rank": "conv_rank", "backbone": "backbone",
                    "checkpoint": "checkpoint", "lr": "lr", "batch_size": "batch_size", "window_seconds": "window_seconds",
                    "device": "device", "compile": "compile", "seed": "seed", "out": "out", "secure": "secure", "clip": "clip",
                    "dp_sigma": "dp_sigma", "dp_delta": "dp_delta", "secagg_threshold": "secagg_threshold",
                    "secagg_neighbours": "secagg_neighbours", "secagg_weight_cap": "secagg_weight_cap",
                    "quant_scale": "quant_scale", "aggregation": "aggregation", "fail_sites": "fail_sites",
                    "fail_at": "fail_at", "reply_timeout": "reply_timeout", "evaluate_every": "evaluate_every",
                    "evaluate_in": "evaluate_in"}


def _explicit_options(ctx: typer.Context) -> dict:
    """The simulate options given on the command line (not left at their defaults), as RunConfig settings."""
    from click.core import ParameterSource

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    defaults = {p.name: norm(p.default) for p in ctx.command.params}
    given = {}
    for name, field in _SIMULATE_FIELDS.items():
        value = norm(ctx.params[name])
        # a value other than the option's default counts as given too: some click/typer versions report every
        # parameter's source as DEFAULT (seen on a host with another typer: `--out` was dropped)
        if (ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
                or value != defaults.get(name, value)):
            given[field] = ",".join(value) if name == "site" else value
    return given


def _simulate_scenario(ctx: typer.Context, name: str, verbose: bool, debug: bool) -> None:
    try:
        from .scenarios import load_scenario, require_applied, resolve

        sc = load_scenario(name)
        overrides = _explicit_options(ctx)
        cfg, pending = resolve(sc, overrides)
        require_applied(pending, f"Scenario {sc.name!r}")
        if not cfg.out:
            cfg = cfg.replace(out=f"runs/{sc.name}-{cfg.mode}-{cfg.strategy}-s{cfg.seed}")
        if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file.")
        console.print(f"scenario [bold]{sc.name}[/]: {sc.description}"
                      + (f" (overridden: {', '.join(sorted(overrides))})" if overrides else ""))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(exc, debug)
    try:
        _run_simulate(cfg, verbose)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        _fail(exc, debug)


def _run_simulate(cfg, verbose: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .experiment import prepare_sites, run_centralized, run_local
    from .outputs import write_outputs

    start = time.perf_counter()
    n_sites = cfg.federated_sites
    with console.status(f"Loading {cfg.dataset} sites and holding out subjects…"):
        if cfg.mode == "federated" and n_sites > 10:  # the clients load their own sites; show a few here
            from .experiment import prepare_site

            sites = [prepare_site(cfg, i) for i in range(3)]
        else:
            sites = prepare_sites(cfg)
            n_sites = len(sites)
    table = Table(title=f"{n_sites} sites ({cfg.dataset})" + (f", the first {len(sites)} shown" if len(sites) < n_sites else ""),
                  show_edge=False)
    for col in ("site", "train subj.", "train win.", "test subj.", "test win."):
        table.add_column(col, justify="right")
    for s in sites:
        d = s.describe()
        table.add_row(s.name, str(d["train_subjects"]), str(d["train_windows"]), str(d["test_subjects"]), str(d["test_windows"]))
    console.print(table)
    console.print(f"mode [bold]{cfg.mode}[/], strategy [bold]{cfg.strategy}[/], backbone {cfg.backbone}, "
                  f"{cfg.rounds} rounds × {cfg.local_epochs} local epochs, seed {cfg.seed}")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = progress.add_task(cfg.mode, total=cfg.rounds)

    def on_round(rec: dict) -> None:
        t = rec["test"] or {}
        extra = ""
        if rec.get("failed"):
            extra += f"  [red]round failed: {rec['failed']}[/]"
        eps = (rec.get("secure") or {}).get("dp", {}).get("epsilon") if isinstance(rec.get("secure"), dict) else None
        if eps is not None:
            extra += f"  ε {eps:.3g}"
        progress.console.print(
            f"round {rec['round']:>3}  loss {_fmt(rec['train_loss'])}  held-out bal.acc {_fmt(t.get('balanced_accuracy'))}  "
            f"kappa {_fmt(t.get('cohen_kappa'))}  AUROC {_fmt(t.get('auroc'))}  ({rec['seconds']:.1f} s){extra}"
        )
        progress.advance(task)

    with progress:
        if cfg.mode == "federated":
            from .federation.simulation import run_federated_simulation

            result = run_federated_simulation(cfg, n_sites=n_sites, on_round=on_round, verbose=verbose)
        elif cfg.mode == "centralized":
            result = run_centralized(cfg, sites, on_round)
        else:
            result = run_local(cfg, sites, on_round)
    wall = time.perf_counter() - start
    out = write_outputs(cfg, result, wall_seconds=wall)
    summary = json.loads((out / "summary.json").read_text())
    res = Table(title=f"held-out subjects — {cfg.mode} {cfg.strategy}", show_edge=False)
    res.add_column("")
    for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc"):
        res.add_column(k, justify="right")
    res.add_row("pooled", *[_fmt(summary["test"][k]) for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")])
    for name, m in summary["per_site"].items():
        res.add_row(name, *[_fmt(m[k]) for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")])
    console.print(res)
    comm = summary["communication"]
    console.print(f"trainable {summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters; "
                  f"upload {comm['bytes_up_per_site_per_round']:,} B/site/round; {wall:.1f} s")
    console.print(f"outputs in [bold]{out}[/]: summary.json, metrics.jsonl, "
                  f"{'adapters/' if cfg.mode == 'local' else 'adapter/'}, learning_curve.png")


def _cache_path(cache_dir: str) -> str | None:
    """--cache-dir: '' = the default location, 'off' = no cache."""
    if cache_dir == "off":
        return None
    if cache_dir:
        return cache_dir
    from .data.cache import default_cache_dir

    return str(default_cache_dir())


@app.command()
def check(
    site: Optional[Path] = typer.Option(None, "--site", help="The site's TOML file (data root, format, labels, channels)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Quick use without a site file: a folder of recordings."),
    fmt: str = typer.Option("auto", "--format", help="--data-dir: edf | bdf | brainvision | eeglab | fif | bids | auto."),
    label_map: str = typer.Option("", "--label-map", help="--data-dir: annotation -> label, e.g. 'T1=left,T2=right'."),
    labels: str = typer.Option("", "--labels", help="The federation's classes, comma-separated (default: the site file's labels)."),
    channels: str = typer.Option("", "--channels", help="Channels the federation's windows hold, comma-separated (default: each recording's)."),
    max_interpolated: int = typer.Option(0, "--max-interpolated", help="Most missing channels a recording may have interpolated."),
    window_seconds: float = typer.Option(4.0, "--window-seconds", help="Window length in 1-s patches."),
    reject_uv: float = typer.Option(0.0, "--reject-uv", help="Reject windows whose peak-to-peak amplitude exceeds this (µV; 0: keep all)."),
    strict: bool = typer.Option(False, "--strict", help="Make the first bad file fatal (default: skip and count it)."),
    as_json: bool = typer.Option(False, "--json", help="Print only a JSON report."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Read a site's recordings as training would and report what is usable; exit 1 when the site cannot train.

    The report names files, channels, rates, durations, windows per label and
    per subject, and amplitude checks; it never prints signal values or
    identifiers from the recordings' headers.
    """
    _setup_logging(verbose and not as_json)
    if as_json or not verbose:
        for name in ("fedeeg", "mne"):  # the report carries every warning
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from .data.check import check_site
        from .data.preprocessing import PreprocessSpec
        from .data.site import SiteConfig, load_site_config

        if (site is None) == (data_dir is None):
            raise ValueError("Give either --site SITE.toml or --data-dir FOLDER (with --format and --label-map), not both or neither.")
        if site is not None:
            site_cfg = load_site_config(site)
        else:
            pairs = [p.split("=", 1) for p in label_map.split(",") if p.strip()]
            if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
                raise ValueError(f"--label-map must look like 'T1=left,T2=right' (annotation=label), got {label_map!r}.")
            site_cfg = SiteConfig.from_dict(
                {"site": {"name": data_dir.name}, "data": {"root": str(data_dir), "format": fmt},
                 "labels": {"source": "annotations", "mapping": {k.strip(): v.strip() for k, v in pairs}}},
                base_dir=Path.cwd())
        label_names = tuple(x.strip() for x in labels.split(",") if x.strip()) or tuple(
            dict.fromkeys(v for _, v in site_cfg.labels.values()))
        if not label_names:
            raise ValueError(f"The site's labels come from a {site_cfg.labels.source}: give the federation's classes with --labels a,b.")
        spec = PreprocessSpec(window_seconds=window_seconds, channels=tuple(x.strip() for x in channels.split(",") if x.strip()) or None,
                              max_interpolated=max_interpolated, reject_peak_to_peak=reject_uv or None)
        report = check_site(site_cfg, spec, label_names, strict=strict or None)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(report.format_text() + "\n")
    raise typer.Exit(0 if report.can_train else 1)


@app.command()
def evaluate(
    adapter: Path = typer.Option(..., help="Model folder written by a run (OUT/adapter)."),
    dataset: str = typer.Option("synthetic", help="synthetic | eegmat | folder (recordings described by --site files)."),
    data_dir: str = typer.Option("", "--data-dir", help="Folder of the eegmat recordings."),
    site: list[str] = typer.Option([], "--site", help="--dataset folder: a site's TOML file (once per site)."),
    cache_dir: str = typer.Option("", "--cache-dir", help="Preprocessed-window cache (default $FEDEEG_CACHE_DIR or ~/.cache/fedeeg; 'off': none)."),
    checkpoint: str = typer.Option("", help="Backbone checkpoint, if the adapter was trained on one."),
    sites: int = typer.Option(3, help="Synthetic: number of sites to generate."),
    seed: int = typer.Option(12345, help="Synthetic: seed of the generated data (default: subjects unseen in training)."),
    as_json: bool = typer.Option(False, "--json", help="Print only a JSON object."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Evaluate a saved adapter on a dataset, with the preprocessing recorded in it."""
    _setup_logging(verbose and not as_json)
    if as_json:
        logging.getLogger("fedeeg").setLevel(logging.WARNING)
    try:
        from .evaluation import evaluate_model_dir

        result = evaluate_model_dir(adapter, dataset=dataset, data_dir=data_dir or None, checkpoint=checkpoint or None,
                                    n_sites=sites, seed=seed, site_files=site, cache_dir=_cache_path(cache_dir))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"{adapter} on {dataset}", show_edge=False)
    table.add_column("")
    for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc", "n_windows"):
        table.add_column(k, justify="right")
    table.add_row("all", *[_fmt(result[k]) for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")], str(result["n_windows"]))
    for name, m in result["per_site"].items():
        table.add_row(name, *[_fmt(m[k]) for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")], str(m["n_windows"]))
    Console().print(table)


@app.command()
def pretrain(
    dataset: str = typer.Option("synthetic", help="synthetic | eegmat"),
    data_dir: str = typer.Option("", "--data-dir", help="Folder of the eegmat EDF files and subject-info.csv."),
    sites: int = typer.Option(3, help="Number of sites (synthetic, or eegmat with --split subject)."),
    split: str = typer.Option("year", help="eegmat: year (3 sites by recording year) | subject (round-robin)."),
    test_fraction: float = typer.Option(0.34, "--test-fraction",
                                        help="Fraction of subjects held out inside every site (never used here; "
                                             "use the fine-tuning run's value)."),
    backbone: str = typer.Option("labram-small", help="labram-small | labram-base | labram-large | labram-huge."),
    federated: bool = typer.Option(False, "--federated/--central",
                                   help="Federated over Flower (full weights averaged, sites keep their EEG) "
                                        "or central on the pooled training windows."),
    epochs: int = typer.Option(20, help="Central: epochs over the pooled training windows."),
    rounds: int = typer.Option(10, help="Federated: rounds."),
    local_epochs: int = typer.Option(2, "--local-epochs", help="Federated: local epochs per round."),
    mask_ratio: float = typer.Option(0.5, "--mask-ratio", help="Fraction of each window's patches masked."),
    target: str = typer.Option("spectrum", help="spectrum (Fourier amplitude + phase, LaBraM) | raw (samples)."),
    lr: float = typer.Option(5e-4, help="Peak learning rate (warm-up, then cosine decay)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    window_seconds: float = typer.Option(4.0, "--window-seconds", help="Window length in 1-s patches."),
    checkpoint: str = typer.Option("", help="Continue from these LaBraM weights (default: random init from --seed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    seed: int = typer.Option(0, help="Seed of the subject split (use the fine-tuning run's), init, masks, shuffling."),
    out: str = typer.Option("", help="Output folder (default runs/pretrain-DATASET-BACKBONE-MODE-sSEED)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower, Ray and MNE logs."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Self-supervised masked-patch pretraining of a LaBraM backbone on the sites' unlabeled training windows.

    Writes OUT/backbone.safetensors (for `fedeeg simulate --checkpoint`), OUT/pretrain_manifest.json and
    OUT/loss_curve.png. Held-out subjects are never used.
    """
    _setup_logging(verbose)
    try:
        from .pretrain import PretrainConfig

        mode = "federated" if federated else "central"
        out = out or f"runs/pretrain-{dataset}-{backbone}-{mode}-s{seed}"
        cfg = PretrainConfig(backbone=backbone, dataset=dataset, data_dir=data_dir, sites=sites, split=split,
                             test_fraction=test_fraction, seed=seed, window_seconds=window_seconds, federated=federated,
                             epochs=epochs, rounds=rounds, local_epochs=local_epochs, mask_ratio=mask_ratio,
                             target=target, lr=lr, batch_size=batch_size, checkpoint=checkpoint, device=device, out=out)
        if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file.")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(exc, debug)
    try:
        _run_pretrain(cfg, verbose)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError, FloatingPointError) as exc:
        _fail(exc, debug)


def _run_pretrain(cfg, verbose: bool) -> None:
    import shlex

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .pretrain import build_pretrainer, count_trainable, pretrain_central, pretrain_windows, write_pretrain_outputs

    start = time.perf_counter()
    with console.status(f"Loading {cfg.dataset} sites and holding out subjects…"):
        windows = pretrain_windows(cfg)
    table = Table(title=f"{len(windows)} sites ({cfg.dataset}): training subjects only, unlabeled", show_edge=False)
    for col in ("site", "subjects", "windows"):
        table.add_column(col, justify="right")
    for name, w in windows.items():
        table.add_row(name, str(len(w.subjects)), str(w.n_windows))
    console.print(table)
    n_trainable = count_trainable(build_pretrainer(cfg))
    unit, total = ("rounds", cfg.rounds) if cfg.federated else ("epochs", cfg.epochs)
    schedule = f"{cfg.rounds} rounds × {cfg.local_epochs} local epochs" if cfg.federated else f"{cfg.epochs} epochs"
    console.print(f"{cfg.mode} masked-patch pretraining of [bold]{cfg.backbone}[/] ({n_trainable:,} trainable parameters: "
                  f"backbone + mask token + decoder), target {cfg.target}, mask ratio {cfg.mask_ratio}"
                  f"{' (symmetric)' if cfg.symmetric else ''}, {schedule}, lr {cfg.lr:g}, seed {cfg.seed}")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} " + unit),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = progress.add_task(f"pretrain ({cfg.mode})", total=total)

    def on_step(rec: dict) -> None:
        key = "round" if "round" in rec else "epoch"
        extra = f"  {rec['sites_answered']} sites" if "sites_answered" in rec else ""
        if rec.get("rejected"):
            extra += f", {len(rec['rejected'])} rejected"
        progress.console.print(f"{key} {rec[key]:>3}  loss {rec['loss']:.4f}  {rec['windows_per_second']:.1f} windows/s  "
                               f"({rec['seconds']:.1f} s){extra}")
        progress.advance(task)

    with progress:
        if cfg.federated:
            from .federation.pretrain import run_pretrain_simulation

            result = run_pretrain_simulation(cfg, n_sites=len(windows), on_round=on_step, verbose=verbose)
        else:
            result = pretrain_central(cfg, windows, on_epoch=on_step)
    wall = time.perf_counter() - start
    out = write_pretrain_outputs(cfg, result, wall_seconds=wall)
    ckpt = out / "backbone.safetensors"
    wps = [h["windows_per_second"] for h in result.history]
    console.print(f"final loss {result.losses[-1]:.4f} (first {result.losses[0]:.4f}); {result.n_windows} windows, "
                  f"mean {sum(wps) / len(wps):.1f} windows/s; {wall:.1f} s")
    console.print(f"checkpoint: [bold]{ckpt}[/] (+ pretrain_manifest.json, loss_curve.png)")
    cmd = ["fedeeg", "simulate", "--dataset", cfg.dataset]
    if cfg.data_dir:
        cmd += ["--data-dir", cfg.data_dir]
    cmd += ["--split", cfg.split, "--sites", str(len(windows)), "--test-fraction", str(cfg.test_fraction),
            "--seed", str(cfg.seed), "--backbone", cfg.backbone, "--window-seconds", str(cfg.window_seconds),
            "--checkpoint", str(ckpt)]
    console.print("fine-tune with it (same split and seed, so its held-out subjects stay unseen):")
    console.print(shlex.join(cmd), markup=False, highlight=False, soft_wrap=True)


@app.command()
def sweep(
    grid: str = typer.Option(..., "--grid", help="Settings to vary, space-separated key=v1,v2 items, e.g. "
                             "'strategy=ffa,fedit,full lora_rank=1,2,4,8,16 seed=0,1,2' (any run setting)."),
    scenario: str = typer.Option("", "--scenario", help="The base scenario (name or TOML path; default: simulate's defaults)."),
    runs: str = typer.Option("", "--runs", help="Folder of the cells (default runs/sweep-SCENARIO); one CELL/ folder each."),
    data_dir: str = typer.Option("", "--data-dir", help="eegmat: folder of the recordings (for every cell)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run cells in this process (default: one "
                                    "`fedeeg simulate` subprocess per cell, which isolates Ray and memory)."),
    stop_on_error: bool = typer.Option(False, "--stop-on-error", help="Stop at the first failed cell (default: go on)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and their state; run nothing."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Federated cells' simulation engine: ray | inprocess (see `fedeeg simulate --engine`)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run a grid of runs over a scenario; finished cells (with a summary.json) are skipped, so a killed sweep resumes.

    Every cell writes RUNS/CELL/ (scenario.toml with its full settings, simulate.log, and the run's outputs); then
    `fedeeg report RUNS` tabulates them.
    """
    _setup_logging(verbose)
    _set_engine(engine, debug)
    try:
        from .scenarios import load_scenario
        from .sweep import parse_grid, plan_sweep, run_sweep

        sc = load_scenario(scenario) if scenario else None
        runs_dir = runs or f"runs/sweep-{sc.name if sc else 'defaults'}"
        cells = plan_sweep(sc, parse_grid(grid), runs_dir, {"data_dir": data_dir} if data_dir else None)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(exc, debug)
    n_done = sum(c.done for c in cells)
    console.print(f"sweep of {len(cells)} cells in [bold]{runs_dir}[/]: {n_done} finished before, {len(cells) - n_done} to run")
    if dry_run:
        for c in cells:
            console.print(f"  {'done' if c.done else 'todo'}  {c.name}", markup=False, highlight=False)
        return
    report = run_sweep(cells, scenario=sc, runner="inprocess" if in_process else "subprocess",
                       keep_going=not stop_on_error)
    console.print(f"ran {len(report.ran)}, skipped {len(report.skipped)} (finished before), failed {len(report.failed)}"
                  + (f": {', '.join(report.failed)} (see CELL/simulate.log)" if report.failed else ""))
    console.print(f"tabulate with: fedeeg report {runs_dir}", markup=False, highlight=False)
    if report.failed:
        raise typer.Exit(code=1)


@app.command()
def report(
    runs_dir: Path = typer.Argument(..., help="Folder holding runs (any depth; each run a folder with summary.json)."),
    out: str = typer.Option("", "--out", help="Report folder (default RUNS_DIR/report)."),
    title: str = typer.Option("", "--title", help="Heading of report.md."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Tabulate and plot the runs under RUNS_DIR: report.md (mean ± sd over seeds, number of seeds), report.json and
    PNG plots (learning curves, accuracy vs LoRA rank, accuracy vs communicated bytes, per-site accuracy)."""
    _setup_logging(verbose)
    try:
        from .report import write_report

        folder = write_report(runs_dir, out or None, title=title)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        _fail(exc, debug)
    console.print(f"report in [bold]{folder}[/]: " + ", ".join(sorted(p.name for p in folder.iterdir())))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    app()


# Deployment commands (issue 6): fedeeg server|client|certs|site|audit.
from .deploy.cli import register as _register_deploy_commands  # noqa: E402

_register_deploy_commands(app)


if __name__ == "__main__":  # pragma: no cover
    main()
