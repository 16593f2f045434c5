"""The ``ehr-alerts`` command line."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rules.catalog import Catalog, RuleLoadError, load_catalog
from rules.engine import Decision, evaluate
from rules.facts import Fact, latest_versions
from rules.fhirtime import isoformat, parse_time
from rules.model import rule_json_schema
from rules.normalize import NormalizeOptions, normalize_resources
from rules.site import SiteProfile, SiteProfileError, read_site_profile
from workers.sources import read_all

app = typer.Typer(help="ehr-alerts: Mg/K clinical alerting for FHIR R4 data.", no_args_is_help=True)
rules_app = typer.Typer(help="Rule catalog commands.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
token_app = typer.Typer(help="Review and feed tokens (dev profile only).", no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _catalog_or_exit(directory: Path | None, site: Path | None = None) -> Catalog:
    """The catalog (rule folder or packaged) with the site profile applied and card times in the display zone;
    exit 2 naming every problem of the rules or the profile."""
    from config.settings import get_settings

    try:
        catalog = load_catalog(directory)
    except RuleLoadError as exc:
        err.print("[bold red]Rule catalog refused[/]")
        for problem in exc.problems:
            err.print(f"  - {problem}")
        raise typer.Exit(2) from exc
    try:
        profile = read_site_profile(site) if site else None
        return catalog.configure(
            site=profile, display_zone=get_settings().display_timezone, file=site.name if site else ""
        )
    except SiteProfileError as exc:
        err.print("[bold red]Site profile refused[/]")
        for problem in exc.problems:
            err.print(f"  - {problem}")
        raise typer.Exit(2) from exc


def _default_site(site: Path | None) -> Path | None:
    from config.settings import get_settings

    return site if site is not None else get_settings().site_profile


def _print_site(profile: SiteProfile) -> None:
    table = Table("rule", "key", "site value", title=f"site profile {profile.name}")
    for rule_id, key, value in profile.summary():
        table.add_row(rule_id, key, value)
    console.print(table)


@rules_app.command("check")
def rules_check(
    directory: Annotated[Path | None, typer.Option("--dir", help="Rule folder (default: packaged catalog)")] = None,
    site: Annotated[
        Path | None,
        typer.Option(
            "--site", help="Site profile to validate and apply (default: EHR_ALERTS_SITE_PROFILE)", exists=True
        ),
    ] = None,
) -> None:
    """Validate every rule file, run its embedded tests, and validate the site profile against the rules."""
    catalog = _catalog_or_exit(directory, _default_site(site))
    table = Table("rule", "version", "status", "applies to", "embedded tests")
    for rule in catalog.rules:
        reports = [r for r in catalog.test_reports if r.rule_id == rule.id]
        app = rule.applicability
        where = ", ".join(app.encounter_classes) if app.encounter_classes else "any setting"
        ages = f">= {app.min_age_years} y" if app.min_age_years else "any age"
        passed = f"{sum(r.passed for r in reports)}/{len(reports)} passed"
        table.add_row(rule.id, rule.version, rule.status, f"{ages}; {where}", passed)
    console.print(table)
    if catalog.site is not None:
        _print_site(catalog.site)
    console.print(f"{len(catalog.rules)} rules OK" + (f"; site profile {catalog.site.name} OK" if catalog.site else ""))


@rules_app.command("schema")
def rules_schema() -> None:
    """Print the JSON Schema of the rule file format (generated from the pydantic model)."""
    sys.stdout.write(json.dumps(rule_json_schema(), indent=2, sort_keys=True) + "\n")


def _load_facts(paths: list[Path], options: NormalizeOptions) -> tuple[list[Fact], Counter[str], list[str]]:
    facts: list[Fact] = []
    counts: Counter[str] = Counter()
    rejections: list[str] = []
    for item in read_all(paths):
        if item.error is not None:
            counts["rejected"] += 1
            rejections.append(f"{item.origin}: {item.error}")
            continue
        for result in normalize_resources(item.data, options):
            counts[result.outcome] += 1
            facts.extend(result.facts)
            if result.outcome == "rejected":
                rejections.append(f"{item.origin}: {result.resource_type}/{result.resource_id}: {result.reason}")
    return latest_versions(facts), counts, rejections


def _patient_as_of(facts: list[Fact], patient: str) -> datetime | None:
    times = [t for f in facts if f.patient == patient for t in (f.start,) if t is not None]
    return max(times) if times else None


def _decisions(facts: list[Fact], rules: list[Any], as_of: datetime | None) -> list[Decision]:
    decisions: list[Decision] = []
    for patient in sorted({f.patient for f in facts}):
        when = as_of or _patient_as_of(facts, patient)
        if when is not None:
            decisions.extend(evaluate(rules, facts, when, patient))
    return decisions


@app.command("evaluate")
def evaluate_command(
    paths: Annotated[list[Path], typer.Argument(help="Bundles, resources, ndjson files or folders", exists=True)],
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Evaluate as of this instant (default: each patient's latest data)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print firing decisions with their cards as JSON")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="Also list rules that did not fire")] = False,
    include_preliminary: Annotated[bool, typer.Option(help="Count preliminary lab results")] = False,
    rules_dir: Annotated[Path | None, typer.Option("--rules", help="Rule folder (default: packaged)")] = None,
    site: Annotated[
        Path | None, typer.Option("--site", help="Site profile (default: EHR_ALERTS_SITE_PROFILE)", exists=True)
    ] = None,
) -> None:
    """Evaluate the rules over FHIR files and print the alerts they raise."""
    catalog = _catalog_or_exit(rules_dir, _default_site(site))
    try:
        instant = parse_time(as_of) if as_of else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--as-of") from exc
    facts, counts, rejections = _load_facts(paths, NormalizeOptions(include_preliminary=include_preliminary))
    decisions = _decisions(facts, catalog.evaluated(), instant)
    shown = [d for d in decisions if show_all or d.outcome != "not-fires"]
    if as_json:
        payload = [d.model_dump(mode="json", exclude_none=True) for d in shown]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    _print_table(shown)
    patients = len({f.patient for f in facts})
    fired = Counter(d.rule_id for d in decisions if d.fires)
    console.print(
        f"resources: {counts['accepted']} used, {counts['ignored']} not relevant, {counts['rejected']} rejected; "
        f"{len(facts)} facts for {patients} patients; "
        f"alerts: {sum(fired.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(fired.items())) + ")" if fired else "")
        + f"; indeterminate: {sum(d.outcome == 'indeterminate' for d in decisions)}"
    )
    for line in rejections[:20]:
        err.print(f"[yellow]rejected[/] {line}")
    if len(rejections) > 20:
        err.print(f"[yellow]... and {len(rejections) - 20} more rejected[/]")


def _print_table(decisions: list[Decision]) -> None:
    if not decisions:
        console.print("No alerts.")
        return
    table = Table("patient", "rule", "outcome", "severity", "as of", "card / explanation", show_lines=True)
    for d in decisions:
        text = d.card["summary"] if d.card else d.explanation
        table.add_row(d.patient, d.rule_id, d.outcome, d.severity or "", isoformat(parse_time(d.as_of)) or "", text)
    console.print(table)


@app.command("replay")
def replay_command(
    paths: Annotated[list[Path], typer.Argument(help="Bundles, resources, ndjson files or folders", exists=True)],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for real workers to drain the queue")] = 600,
    shift_to_now: Annotated[
        bool | None,
        typer.Option(
            "--shift-to-now/--no-shift-to-now",
            help="Move every time of the extract so its newest event is now (default: on for examples/stream only)",
        ),
    ] = None,
) -> None:
    """Push FHIR files through the real pipeline (ingestion -> Celery -> timeline -> alerts) and summarise.

    The extract's own clock is declared: events are delivered in the order they were recorded, each received
    at that time, and time runs to the end of the feed. Without REDIS_URL this runs embedded: in-process Redis
    (fakeredis) and eager Celery, same code paths.
    """
    from service.replay import replay

    replay(paths, console, timeout=timeout, shift_to_now=shift_to_now)


@app.command("what-if")
def what_if_command(
    paths: Annotated[list[Path], typer.Argument(help="Bundles, resources, ndjson files or folders", exists=True)],
    site: Annotated[
        Path | None, typer.Option("--site", help="Candidate site profile (the change to judge)", exists=True)
    ] = None,
    base_site: Annotated[
        Path | None,
        typer.Option("--base-site", help="Base site profile (default: none, the rules as shipped)", exists=True),
    ] = None,
    rules_dir: Annotated[Path | None, typer.Option("--rules", help="Candidate rule folder (default: packaged)")] = None,
    base_rules: Annotated[
        Path | None, typer.Option("--base-rules", help="Base rule folder (default: packaged)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON")] = False,
) -> None:
    """Compare the alerts an extract raises under two set-ups (site profiles or rule folders), without Redis.

    Lists per rule the alerts added and removed and the burden per 1,000 patient-days on each side; shadow rules
    are included, so a site sees what promoting one would cost."""
    from service.whatif import Setup, compare, print_comparison

    def setup(name: str, folder: Path | None, profile: Path | None) -> Setup:
        return Setup(name, _catalog_or_exit(folder, profile))

    base = setup(_setup_name(base_rules, base_site), base_rules, base_site)
    candidate = setup(_setup_name(rules_dir, site), rules_dir, site)
    quiet = Console(stderr=True, highlight=False) if as_json else console
    found = compare(paths, base, candidate, quiet)
    if as_json:
        sys.stdout.write(json.dumps(found.as_json(), indent=2) + "\n")
        return
    print_comparison(found, console)


def _setup_name(folder: Path | None, profile: Path | None) -> str:
    parts = [f"rules {folder}" if folder else "rules as shipped"]
    parts.append(f"site profile {profile.name}" if profile else "no site profile")
    return ", ".join(parts)


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes")] = 1,
) -> None:
    """Run the HTTP API (ingestion, alerts, health)."""
    import uvicorn

    from workers.observability.logging import configure_logging

    configure_logging()  # JSON (or text) on stderr; uvicorn's own config and access log are not used
    uvicorn.run(
        "service.app:app",
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=True,
    )


@app.command("worker")
def worker_command(
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", help="Worker processes")] = 2,
) -> None:
    """Run Celery workers on REDIS_URL (same as `celery -A workers.celery_app worker`).

    Logging follows EHR_ALERTS_LOG_LEVEL / EHR_ALERTS_LOG_FORMAT (JSON lines on stderr by default).
    """
    from config.settings import get_settings
    from workers.celery_app import app as celery_app

    if get_settings().redis_url is None:
        err.print("REDIS_URL is not set: workers need a real Redis broker (the embedded mode runs tasks inline).")
        raise typer.Exit(2)
    from workers.observability.logging import configure_logging

    configure_logging()  # before Celery starts: its start-up warnings are logged as JSON too
    # --quiet: no start-up banner on stdout (logs are JSON lines on stderr)
    celery_app.worker_main(["--quiet", "worker", f"--concurrency={concurrency}", "-Q", "ehr-alerts"])


@app.command("worker-alive")
def worker_alive_command(
    max_age: Annotated[
        float | None, typer.Option(help="Seconds (default: EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE)")
    ] = None,
) -> None:
    """Liveness probe for a worker container: exit 0 if its heartbeat file is fresh, else 1 with the reason."""
    from workers.observability.alive import check

    alive, reason = check(max_age)
    (console if alive else err).print(("alive: " if alive else "not alive: ") + reason)
    if not alive:
        raise typer.Exit(1)


@app.command("dead-letters")
def dead_letters_command(
    redrive: Annotated[bool, typer.Option(help="Re-queue every dead-lettered batch and clear the list")] = False,
) -> None:
    """List events that failed after their retries (and optionally re-drive them)."""
    from config.settings import get_settings
    from workers import inbox
    from workers.pipeline import get_store
    from workers.state.keys import dead_letters as dead_letter_key

    store = get_store()
    records = store.dead_letters()
    table = Table("failed at", "task", "events", "reason")
    for record in records:
        table.add_row(record["failed_at"], record.get("task_id") or "", str(len(record["events"])), record["reason"])
    console.print(table if records else "No dead letters.")
    if redrive and records:
        for record in records:
            inbox.submit(store.client, record["events"], get_settings().redelivery_timeout)
        store.client.ltrim(dead_letter_key(), len(records), -1)
        console.print(f"re-queued {len(records)} batches")


@token_app.command("mint")
def token_mint(
    sub: Annotated[str, typer.Option("--sub", help="Subject (user id) the token is for")],
    role: Annotated[list[str], typer.Option("--role", help="Role: pharmacist, viewer or admin (repeat for several)")],
    minutes: Annotated[int, typer.Option("--minutes", min=1, max=1440, help="Lifetime in minutes")] = 60,
    name: Annotated[str | None, typer.Option("--name", help="Display name")] = None,
) -> None:
    """Print a review token signed by the local dev issuer (EHR_ALERTS_PROFILE=dev only)."""
    from config.settings import SettingsError, get_settings
    from service.security.dev import DevProfileRequired, mint_token

    try:
        profile = get_settings().profile
    except SettingsError as exc:
        err.print(str(exc))
        raise typer.Exit(2) from exc
    if profile != "dev":
        err.print(
            "refused: `token mint` signs tokens with a local dev key, which only the dev profile trusts. "
            "Set EHR_ALERTS_PROFILE=dev (never with real patient data); in production, get tokens from your "
            "OIDC provider."
        )
        raise typer.Exit(2)
    try:
        token = mint_token(sub, role, minutes=minutes, name=name)
    except (ValueError, PermissionError, DevProfileRequired) as exc:
        err.print(f"refused: {exc}")
        raise typer.Exit(2) from exc
    sys.stdout.write(token + "\n")


@token_app.command("mint-feed")
def token_mint_feed(
    sub: Annotated[str, typer.Option("--sub", help="Feed client id (e.g. lab-interface)")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="SMART system scope, e.g. 'system/*.cud' (repeat for several)")
    ],
    minutes: Annotated[int, typer.Option("--minutes", min=1, max=1440, help="Lifetime in minutes")] = 60,
) -> None:
    """Print a feed access token signed by the local dev issuer (EHR_ALERTS_PROFILE=dev only)."""
    from config.settings import get_settings
    from service.security.dev import DevProfileRequired, mint_feed_token

    if get_settings().profile != "dev":
        err.print(
            "refused: dev profile only (EHR_ALERTS_PROFILE=dev); in production the authorization server issues them"
        )
        raise typer.Exit(2)
    try:
        token = mint_feed_token(sub, scope, minutes=minutes)
    except (ValueError, PermissionError, DevProfileRequired) as exc:
        err.print(f"refused: {exc}")
        raise typer.Exit(2) from exc
    sys.stdout.write(token + "\n")


@app.command("config")
def config_command() -> None:
    """Print the effective configuration (environment, then EHR_ALERTS_CONFIG_FILE, then defaults); secrets masked."""
    from config.settings import get_settings

    table = Table("setting", "environment variable", "value")
    for name, value in get_settings().model_dump().items():
        env = "REDIS_URL" if name == "redis_url" else f"EHR_ALERTS_{name.upper()}"
        shown = (
            "***" if value and any(w in name for w in ("key", "secret", "password")) and name != "key_prefix" else value
        )
        if name == "redis_url" and value and "@" in value:
            shown = re.sub(r"//[^@]*@", "//***@", value)
        table.add_row(name, env, json.dumps(shown, default=str))
    console.print(table)
    profile_path = get_settings().site_profile
    if profile_path is not None:
        try:
            _print_site(read_site_profile(profile_path))
        except SiteProfileError as exc:
            err.print("[bold red]Site profile refused[/]")
            for problem in exc.problems:
                err.print(f"  - {problem}")
            raise typer.Exit(2) from exc


def main() -> None:
    """Console-script entry point: invalid configuration stops here, naming the setting."""
    from config.settings import SettingsError, get_settings

    try:
        get_settings()
    except SettingsError as exc:
        err.print(f"[bold red]{exc}[/]")
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
