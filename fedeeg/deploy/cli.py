"""``fedeeg server|client|certs|site|audit``: deployment commands (registered in :mod:`fedeeg.cli`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

server_app = typer.Typer(no_args_is_help=True, help="The coordinator's server (SuperLink + FedEEG ServerApp).")
client_app = typer.Typer(no_args_is_help=True, help="A hospital's client daemon (SuperNode + FedEEG ClientApp).")
certs_app = typer.Typer(no_args_is_help=True, help="The consortium's CA and the server's TLS certificate.")
site_app = typer.Typer(no_args_is_help=True, help="Site enrolment: keys at the site, registration at the coordinator.")
audit_app = typer.Typer(no_args_is_help=True, help="The server's hash-chained audit log.")

logger = logging.getLogger("fedeeg")
_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, KeyError, RuntimeError,
           TimeoutError, OSError)


def _setup(verbose: bool) -> None:
    from ..cli import _setup_logging

    _setup_logging(verbose)


def _fail(exc: BaseException, debug: bool) -> None:
    from ..cli import _fail as fail

    fail(exc, debug)


def _registry_path(registry: Optional[Path], config: Optional[Path]) -> Path:
    if (registry is None) == (config is None):
        raise ValueError("Give either --registry sites.json or --config federation.toml (whose [server] registry is used).")
    if registry is not None:
        return registry
    from .federation_config import load_federation_config

    return load_federation_config(config).registry


@server_app.command("start")
def server_start(
    config: Path = typer.Option(..., "--config", help="The federation's TOML file (see server/federation.example.toml)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain transport, no node authentication: LOCAL TESTS ONLY."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Start the SuperLink (TLS and node authentication on), submit the run and drive it; resumes after a crash."""
    _setup(verbose)
    from ..cli import _fmt, console

    try:
        from .federation_config import load_federation_config

        fed = load_federation_config(config)
    except _ERRORS as exc:
        _fail(exc, debug)
    if insecure:
        console.print("[bold red on white] --insecure: NO TLS, NO NODE AUTHENTICATION. For local tests only; "
                      "never with patient data. [/]")

    def on_round(rec: dict) -> None:
        t = rec["test"] or {}
        console.print(f"round {rec['round']:>3}/{fed.run.rounds}  sites {rec.get('sites_answered', '?')}  "
                      f"loss {rec['train_loss']:.4f}  held-out bal.acc {_fmt(t.get('balanced_accuracy'))}  "
                      f"({rec['seconds']:.1f} s){'  rejected ' + str(len(rec['rejected'])) if rec.get('rejected') else ''}")

    try:
        from .daemons import start_server

        result = start_server(fed, insecure=insecure, on_round=on_round)
    except KeyboardInterrupt:
        console.print("stopped; `fedeeg server start` with the same config resumes after the last checkpoint.")
        raise typer.Exit(130)
    except _ERRORS as exc:
        _fail(exc, debug)
    if result is None:
        console.print(f"the run in {fed.out} is already complete.")
    else:
        console.print(f"done: outputs in [bold]{fed.out}[/] (summary.json, metrics.jsonl, adapter/, audit.jsonl)")


@client_app.command("start")
def client_start(
    config: Path = typer.Option(..., "--config", help="The site's TOML file with a \\[deployment] table "
                                "(see client/site.example.toml)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain transport: LOCAL TESTS ONLY."),
    isolation: str = typer.Option("process", "--isolation", help="process: FedEEG's long-lived ClientApp (default) | "
                                  "subprocess: Flower's default, a new ClientApp process per message (comparison)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Connect this site to the coordinator and answer its rounds until stopped (reconnects with backoff)."""
    _setup(verbose)
    logging.getLogger("fedeeg").setLevel(logging.INFO)
    try:
        from .daemons import start_client
        from .site_config import load_client_config

        site = load_client_config(config)
        start_client(site, insecure=insecure, isolation=isolation)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except _ERRORS as exc:
        _fail(exc, debug)


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(Path("certs"), "--out", help="Folder for ca.pem, ca.key, server.pem, server.key."),
    host: list[str] = typer.Option([], "--host", help="The coordinator's DNS name or IP, as sites dial it (repeat); "
                                   "localhost and 127.0.0.1 are always added."),
    consortium: str = typer.Option("FedEEG consortium", "--consortium", help="The CA's name."),
    days: int = typer.Option(825, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (every site then needs the new ca.pem)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Create the consortium CA and the server certificate; give ca.pem (only) to every site."""
    try:
        from .certs import init_certs

        hosts = list(dict.fromkeys([*host, "localhost", "127.0.0.1"]))
        paths = init_certs(out, hosts=hosts, consortium=consortium, days=days, overwrite=force)
    except _ERRORS as exc:
        _fail(exc, debug)
    typer.echo(f"CA: {paths.ca_cert} (give to every site), {paths.ca_key} (keep offline, 0600)")
    typer.echo(f"server: {paths.server_cert}, {paths.server_key} (0600) for {', '.join(hosts)}")


@site_app.command("new")
def site_new(
    name: str = typer.Argument(..., help="The site's name (lower-case letters, digits, '-', '_')."),
    out: Path = typer.Option(Path("keys"), "--out", help="The site's key folder."),
    force: bool = typer.Option(False, "--force", help="Replace existing keys (register the new .pub again)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """At the site: create its node-authentication and identity keys (private keys 0600, never sent)."""
    try:
        from .keys import new_site_keys

        keys = new_site_keys(name, out, overwrite=force)
    except _ERRORS as exc:
        _fail(exc, debug)
    typer.echo(f"private (stay here, 0600): {keys.node_key}, {keys.identity_key}")
    typer.echo(f"public (send to the coordinator): {keys.node_pub}, {keys.identity_pub}")


@site_app.command("register")
def site_register(
    public_key: Path = typer.Argument(..., help="The site's NAME.pub (its NAME.identity.pem.pub beside it is read too)."),
    registry: Optional[Path] = typer.Option(None, "--registry", help="The registry file (sites.json)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Or the federation's TOML ([server] registry)."),
    name: Optional[str] = typer.Option(None, "--name", help="Site name (default: from the key's comment)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """At the coordinator: allow a site's key (takes effect at the next `fedeeg server start`)."""
    try:
        from .registry import SiteRegistry

        entry = SiteRegistry(_registry_path(registry, config)).register(public_key, name=name)
    except _ERRORS as exc:
        _fail(exc, debug)
    typer.echo(f"registered {entry.name}: {entry.fingerprint}")


@site_app.command("revoke")
def site_revoke(
    name: str = typer.Argument(...),
    registry: Optional[Path] = typer.Option(None, "--registry"),
    config: Optional[Path] = typer.Option(None, "--config"),
    reason: str = typer.Option("", "--reason"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """At the coordinator: refuse a site's key. A running server stops asking the site from its next round; the
    SuperLink refuses its connection (and a secure run's roster drops it) from the next `fedeeg server start`."""
    try:
        from .registry import SiteRegistry

        entry = SiteRegistry(_registry_path(registry, config)).revoke(name, reason=reason)
    except _ERRORS as exc:
        _fail(exc, debug)
    typer.echo(f"revoked {entry.name} ({entry.fingerprint}); a running server stops asking it from its next round; "
               "its connection is refused from the next server start (secure runs: make and send the roster again)")


@site_app.command("roster")
def site_roster(
    out: Path = typer.Option(..., "--out", help="The roster file to write (roster.json): send it to every site."),
    registry: Optional[Path] = typer.Option(None, "--registry", help="The registry file (sites.json)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Or the federation's TOML ([server] registry)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """At the coordinator: write the active sites' identity public keys for secure aggregation (give it to every site)."""
    try:
        from .roster import read_roster, write_roster

        path = write_roster(_registry_path(registry, config), out)
        roster = read_roster(path)
    except _ERRORS as exc:
        _fail(exc, debug)
    for sid, e in enumerate(roster.entries, start=1):
        typer.echo(f"{sid:>3}  {e.name:20s} {e.fingerprint}")
    typer.echo(f"roster of {len(roster.entries)} sites written to {path}: send it to every site "
               "([deployment] roster = \"PATH\" in site.toml); make and send it again after each register/revoke")


@site_app.command("list")
def site_list(
    registry: Optional[Path] = typer.Option(None, "--registry"),
    config: Optional[Path] = typer.Option(None, "--config"),
    as_json: bool = typer.Option(False, "--json"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """The registered sites and their status."""
    try:
        from dataclasses import asdict

        from .registry import SiteRegistry

        entries = SiteRegistry(_registry_path(registry, config)).all()
    except _ERRORS as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps([asdict(e) for e in entries], indent=2) + "\n")
        return
    for e in entries:
        typer.echo(f"{e.name:20s} {e.status:8s} {e.fingerprint}")


@audit_app.command("verify")
def audit_verify(
    path: Path = typer.Argument(..., help="The run's output folder (or its audit.jsonl)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check the audit log's hash chain; exit 1 naming the first altered entry."""
    from .audit import AuditError, verify_audit_log

    try:
        n = verify_audit_log(path)
    except AuditError as exc:
        typer.echo(f"FAILED: {exc}", err=True)
        raise typer.Exit(1)
    except _ERRORS as exc:
        _fail(exc, debug)
    typer.echo(f"OK: {n} entries, chain intact")


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the ``fedeeg`` app."""
    app.add_typer(server_app, name="server")
    app.add_typer(client_app, name="client")
    app.add_typer(certs_app, name="certs")
    app.add_typer(site_app, name="site")
    app.add_typer(audit_app, name="audit")


__all__ = ["server_app", "client_app", "certs_app", "site_app", "audit_app", "register"]
