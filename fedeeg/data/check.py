"""Checking a site's data before training: can this hospital's folder feed the federation?

:func:`check_site` reads everything a site file points to, the same way
training will (:func:`fedeeg.data.site.load_site_windows`), and answers with a
:class:`CheckReport`: whether the site can train, why not, the warnings, and
the full :class:`~fedeeg.data.site.SiteReport` (files read and skipped with
reasons, channels, rates, windows per label and per subject, amplitude checks).
It does not raise for bad files or an unusable site (unless ``strict``); the
report says what is wrong. ``format_text`` renders it as plain text for a
terminal or a log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .labels import LabelError
from .preprocessing import PreprocessSpec
from .readers import DataFileError
from .site import SiteConfig, SiteConfigError, SiteDataError, SiteReport, _load_site

__all__ = ["CheckReport", "check_site"]

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """The answer of :func:`check_site`.

    Attributes
    ----------
    site : str
        Site name.
    label_names : list of str
        The federation's labels.
    can_train : bool
        True when the site gives windows, of every label, from at least one
        subject.
    problems : list of str
        Why the site cannot train (empty when ``can_train``).
    warnings : list of str
        Things to look at that do not stop training (files skipped, fewer than
        two subjects, channels left out, ...).
    errors : list of str
        Errors that stopped the reading (no recordings matched, an invalid label
        table, ...).
    spec : dict
        The preprocessing used (:meth:`PreprocessSpec.to_dict`).
    report : SiteReport | None
        What was read; None when reading stopped before any file.
    """

    site: str
    label_names: list
    can_train: bool
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    report: SiteReport | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "site": self.site,
            "label_names": list(self.label_names),
            "can_train": self.can_train,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "spec": dict(self.spec),
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def format_text(self) -> str:
        """Plain-text rendering (no colours, no markup)."""
        lines = [f"Site {self.site!r}: {'READY to train' if self.can_train else 'CANNOT train'}"]
        r = self.report
        if r is not None:
            lines.append(f"  data: {r.root} (format {r.format})")
            lines.append(f"  recordings: {r.n_found} found, {r.n_read} read, {r.n_skipped} skipped")
            lines.append(f"  channels ({len(r.channels)}): {', '.join(r.channels) if r.channels else '-'}")
            if r.sfreqs:
                lines.append(
                    f"  sampling rates: {', '.join(f'{s:g}' for s in r.sfreqs)} Hz (resampled to {self.spec.get('sfreq', 0):g} Hz)"
                )
            lines.append(f"  windows: {r.n_windows} ({self.spec.get('window_seconds', 0):g} s each)")
            for name in self.label_names:
                lines.append(f"    {name}: {r.windows_per_label.get(name, 0)}")
            lines.append(f"  subjects: {r.n_subjects}")
            for subject, n in r.windows_per_subject.items():
                lines.append(f"    {subject}: {n} windows")
        if self.errors:
            lines.append("Errors:")
            lines.extend(f"  - {e}" for e in self.errors)
        if self.problems:
            lines.append("Cannot train because:")
            lines.extend(f"  - {p}" for p in self.problems)
        if r is not None and r.skipped:
            lines.append("Skipped recordings:")
            lines.extend(f"  - {s['file']}: {s['reason']}" for s in r.skipped)
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        if r is not None and r.files:
            lines.append("Recordings read:")
            for f in r.files:
                per_label = ", ".join(f"{k} {v}" for k, v in f.windows_per_label.items())
                lines.append(
                    f"  - {f.file} [{f.subject}]: {f.format}, {f.sfreq:g} Hz, {f.duration_s:.1f} s, "
                    f"{len(f.channels_found)} channels, windows: {per_label}"
                )
                if f.channels_missing:
                    lines.append(f"      missing channels: {', '.join(f.channels_missing)}")
                if f.bads:
                    lines.append(f"      bad channels: {', '.join(f.bads)}")
                lines.extend(f"      warning: {w}" for w in f.warnings)
        return "\n".join(lines)


def check_site(site_cfg: SiteConfig, spec: PreprocessSpec, label_names, *, strict: bool | None = None) -> CheckReport:
    """Read a site's data as training would and say whether it can train.

    Parameters
    ----------
    site_cfg : SiteConfig
        The site (:func:`~fedeeg.data.site.load_site_config`).
    spec : PreprocessSpec
        The federation's preprocessing.
    label_names : sequence of str
        The federation's classes.
    strict : bool | None
        If True, the first bad file (or an error in the site's set-up) raises
        as in :func:`~fedeeg.data.site.load_site_windows`; if False, nothing
        about the data raises and the report says what is wrong. None
        (default) takes ``[data] strict``.

    Returns
    -------
    report : CheckReport
        ``can_train`` is False when there are no windows, a label has no
        window, or no subject has windows.
    """
    label_names = list(label_names)
    strict = site_cfg.data.strict if strict is None else bool(strict)
    errors: list[str] = []
    site_report = None
    try:
        _, site_report = _load_site(site_cfg, spec, label_names, strict=strict)
    except (SiteDataError, SiteConfigError, LabelError, DataFileError, FileNotFoundError) as err:
        if strict:
            raise
        errors.append(str(err))
        site_report = getattr(err, "report", None)
    problems: list[str] = []
    warnings: list[str] = []
    if site_report is None:
        problems.append("no recording could be read" if not errors else "the site's data could not be read (see errors)")
    else:
        if site_report.n_windows == 0:
            problems.append(
                f"no windows: {site_report.n_read} recording(s) read, {site_report.n_skipped} skipped"
            )
        else:
            missing = [n for n in label_names if site_report.windows_per_label.get(n, 0) == 0]
            if missing:
                problems.append(f"no window of label(s) {missing}")
        if site_report.n_read and not site_report.channels:
            problems.append("no channel common to all recordings (list the site's channels in [channels] pick)")
        if site_report.n_subjects < 1:
            problems.append("no subject with windows")
        elif site_report.n_subjects < 2:
            warnings.append("only 1 subject: no subject can be held out for testing at this site")
        if site_report.n_skipped:
            warnings.append(f"{site_report.n_skipped} of {site_report.n_found} recording(s) skipped (see skipped)")
        warnings.extend(site_report.warnings)
        if len(site_report.sfreqs) > 1:
            warnings.append(f"mixed sampling rates {site_report.sfreqs} Hz (each recording is resampled)")
    report = CheckReport(
        site=site_cfg.name,
        label_names=label_names,
        can_train=not problems and not errors,
        problems=problems,
        warnings=warnings,
        errors=errors,
        spec=spec.to_dict(),
        report=site_report,
    )
    logger.info("check %s: %s", site_cfg.name, "can train" if report.can_train else "cannot train")
    return report
