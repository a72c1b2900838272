"""``facegate server ...``: run the server, migrate its database, validate its config, manage users."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from facegate.configio import ConfigError, report_validation
from server.config import ServerConfig, load_server_config

if TYPE_CHECKING:
    from server.db.session import Database

cli = click.Group("server", help="Run the companion server.")

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None,
    help="Server config TOML (see deploy/server.example.toml).",
)
SECONDS_PER_DAY = 86_400


def _load(config_path: Path | None) -> ServerConfig:
    try:
        return load_server_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc

@contextmanager
def open_database(config: ServerConfig) -> Iterator[Database]:
    """The server's database, migrated to this server's schema; a refusal or failure is a clean CLI error."""
    from server.db.session import Database, DatabaseError

    try:
        db = Database(config.database_url, busy_timeout_ms=config.database.busy_timeout_ms)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    with db:
        try:
            db.migrate()
        except DatabaseError as exc:
            raise click.ClickException(str(exc)) from exc
        yield db


@cli.command("run")
@CONFIG_OPTION
@click.option("--validate-config", is_flag=True, help="Only validate the config; exit 0 or 1.")
def run(config_path: Path | None, validate_config: bool) -> None:
    """Serve the API, the web station and the audit subscriber until SIGTERM/SIGINT."""
    if validate_config:
        sys.exit(report_validation(load_server_config, config_path))
    config = _load(config_path)
    import uvicorn

    from server.app import create_app
    from server.db.session import DatabaseError

    try:
        app = create_app(config)  # migrates the database first; refuses one newer than this server
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    # log_config=None keeps facegate's logging setup (plain or JSON lines) for uvicorn's loggers too.
    uvicorn.run(app, host=config.http.host, port=config.http.port, log_config=None, proxy_headers=True)


@cli.command("migrate")
@CONFIG_OPTION
@click.option("--revision", default="head", show_default=True,
              help="Upgrade to this revision (only upgrades; see server/db/migrations/versions).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
def migrate_cmd(config_path: Path | None, revision: str, as_json: bool) -> None:
    """Upgrade the database schema (the server also does this at start); refuses a newer database."""
    import json

    from server.db.session import Database, DatabaseError

    config = _load(config_path)
    try:
        with Database(config.database_url, busy_timeout_ms=config.database.busy_timeout_ms) as db:
            report = db.migrate(revision)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
        return
    how = (f"applied {', '.join(report.applied)}" if report.applied else "nothing to apply")
    legacy = "; pre-migration database stamped at the baseline" if report.legacy_stamped else ""
    click.echo(f"{report.database}: {report.from_revision or 'unversioned'} -> {report.to_revision} "
               f"({how}{legacy})")


@cli.command("create-user")
@CONFIG_OPTION
@click.option("--username", required=True, help="Login name (letters, digits, '_', '.', '-').")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="viewer", show_default=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              envvar="FACEGATE_NEW_PASSWORD", help="Prompted when omitted (or FACEGATE_NEW_PASSWORD).")
def create_user_cmd(config_path: Path | None, username: str, role: str, password: str) -> None:
    """Add a user with an argon2id-hashed password."""
    from server.audit.log import AuditAction, record
    from server.auth.service import AuthError, Role, create_user

    config = _load(config_path)
    with open_database(config) as db:
        try:
            with db.transaction() as session:
                create_user(session, username, password, Role(role), config.auth.min_password_length)
                record(session, "cli", AuditAction.USER_CREATED, f"created {role} user {username!r}")
        except AuthError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"created {role} user {username}", err=True)


@cli.command("create-token")
@CONFIG_OPTION
@click.option("--username", required=True, help="Existing user the token acts as.")
@click.option("--name", default="api", show_default=True, help="What the token is for.")
@click.option("--ttl-days", type=click.IntRange(0, 3650), default=90, show_default=True,
              help="Lifetime in days (0: never expires).")
def create_token_cmd(config_path: Path | None, username: str, name: str, ttl_days: int) -> None:
    """Print a new bearer token for USERNAME on stdout (shown once; only its hash is stored)."""
    from sqlalchemy import select

    from server.audit.log import AuditAction, record
    from server.auth.service import issue_token
    from server.db.models import User

    config = _load(config_path)
    with open_database(config) as db:
        with db.transaction() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None or user.disabled:
                raise click.ClickException(f"no enabled user {username!r}; create it with `create-user`")
            ttl_s = ttl_days * SECONDS_PER_DAY if ttl_days else None
            token, _row = issue_token(session, user, ttl_s, name[:100])
            record(session, "cli", AuditAction.TOKEN_CREATED, f"created token {name!r} for {username!r}")
    click.echo(token)


@cli.command("disable-user")
@CONFIG_OPTION
@click.option("--username", required=True, help="The user to disable (every token is revoked).")
@click.option("--enable", is_flag=True, help="Enable the user again instead.")
def disable_user_cmd(config_path: Path | None, username: str, enable: bool) -> None:
    """Disable USERNAME and revoke all its tokens (or --enable it again)."""
    from server.audit.log import AuditAction, record
    from server.auth.service import AuthError, set_user_disabled

    config = _load(config_path)
    with open_database(config) as db:
        try:
            with db.transaction() as session:
                _user, revoked = set_user_disabled(session, username, not enable)
                action = AuditAction.USER_ENABLED if enable else AuditAction.USER_DISABLED
                record(session, "cli", action, f"{action.value} {username!r} ({revoked} token(s) revoked)",
                       subject=username)
        except AuthError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"{'enabled' if enable else 'disabled'} {username} ({revoked} token(s) revoked)", err=True)


@cli.command("revoke-tokens")
@CONFIG_OPTION
@click.option("--username", required=True, help="Revoke every token of this user.")
def revoke_tokens_cmd(config_path: Path | None, username: str) -> None:
    """Revoke every token (web sessions and API tokens) of USERNAME; the user stays enabled."""
    from sqlalchemy import select

    from server.audit.log import AuditAction, record
    from server.auth.service import revoke_user_tokens
    from server.db.models import User

    config = _load(config_path)
    with open_database(config) as db:
        with db.transaction() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                raise click.ClickException(f"no user {username!r}")
            revoked = revoke_user_tokens(session, user)
            record(session, "cli", AuditAction.TOKENS_REVOKED, f"revoked {revoked} token(s) of {username!r}",
                   subject=username)
    click.echo(f"revoked {revoked} token(s) of {username}", err=True)


@cli.command("rotate-chip-key")
@CONFIG_OPTION
@click.option("--new-key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the new key. Required when the key comes from the environment; "
                   "default: <key file>.new, installed as the key file when done.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (the server must be stopped).")
def rotate_chip_key_cmd(config_path: Path | None, new_key_file: Path | None, yes: bool) -> None:
    """Re-encrypt every chip and template under a new chip key, then install it.

    Stop the server first. Safe to rerun after an interruption: rows already under the new key are
    skipped. The old key file is kept as <key file>.old-<key id>; back up the new key before deleting it.
    """
    from server.keyrotation import KeyRotationError, rotate_chip_key, rows_to_rotate

    config = _load(config_path)
    if not yes:
        click.confirm("Is the facegate server stopped? (a running server would keep using the old key)",
                      abort=True)
    with open_database(config) as db:
        from facegate.progress import progress_bar

        with progress_bar("re-encrypting", rows_to_rotate(db)) as advance:
            try:
                report = rotate_chip_key(config, db, new_key_file=new_key_file, progress=advance)
            except KeyRotationError as exc:
                raise click.ClickException(str(exc)) from exc
    click.echo(f"chip key {report.old_key_id} -> {report.new_key_id}: {report.chips} chips and "
               f"{report.templates} templates re-encrypted ({report.skipped} already were)"
               + ("; delta ledger re-sealed" if report.ledger_resealed else ""))
    click.echo(f"new key: {report.key_file}" + (f"; old key kept at {report.retired_key_file}"
                                                 if report.retired_key_file else
                                                 " (put it in FACEGATE_SERVER__CRYPTO__CHIP_KEY or "
                                                 "[crypto] chip_key_file before starting the server)"))


@cli.command("remove-old-chip-key")
@CONFIG_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove_old_chip_key_cmd(config_path: Path | None, yes: bool) -> None:
    """Delete the old key files a confirmed rotation kept (audit-logged rotation, no row left under them)."""
    from server.keyrotation import KeyRotationError, remove_retired_key, retired_key_files

    config = _load(config_path)
    files = retired_key_files(config)
    if not files:
        click.echo("no retired chip key files", err=True)
        return
    if not yes:
        click.confirm(f"delete {len(files)} retired chip key file(s)? Backups made with them stay readable "
                      "only with them", abort=True)
    with open_database(config) as db:
        for path in files:
            try:
                removed = remove_retired_key(config, db, path)
            except KeyRotationError as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(f"removed retired chip key {removed} ({path})")


@cli.command("bind-rows")
@CONFIG_OPTION
def bind_rows_cmd(config_path: Path | None) -> None:
    """Bind chips sealed before the person binding to their person (idempotent; also runs at start)."""
    import json

    from server.crypto import load_chip_cipher
    from server.rowbinding import bind_chip_rows

    config = _load(config_path)
    with open_database(config) as db:
        report = bind_chip_rows(db, load_chip_cipher(config))
    click.echo(json.dumps({"bound": report.bound, "already": report.already,
                           "refused": list(report.refused)}))
    if report.refused:
        sys.exit(1)


@cli.command("gen-key")
def gen_key() -> None:
    """Print a new base64 chip-encryption key (for FACEGATE_SERVER__CRYPTO__CHIP_KEY or a key file)."""
    from server.crypto import generate_key_text

    click.echo(generate_key_text())
