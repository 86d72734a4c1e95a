"""The ``hbmon`` command line: a thin shell over the package.

Errors become one line on stderr and an exit code: 2 for bad usage or configuration,
1 for runtime failures, 0 for success.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hbmon import __version__
from hbmon.console import format_status
from hbmon.errors import HbmonError, UsageError, VolumeError
from hbmon.logs import FORMATS, on_journal
from hbmon.logs import setup as setup_logs
from hbmon.record import Record
from hbmon.volume import claim_slot, open_volume, read_slot, write_slot

log = logging.getLogger("hbmon")

DEFAULT_URL = "http://127.0.0.1:9799"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hbmon", description="Heartbeats through mirrored volumes and the network.")
    p.add_argument("--version", action="version", version=f"hbmon {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="log line format (default: the configuration's log_format, else text)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the site daemon")
    run.add_argument("-c", "--config", required=True, help="site configuration (TOML)")
    run.add_argument("--listen", help="HOST:PORT for HTTP (overrides the configuration)")

    st = sub.add_parser("status", help="the heartbeat status table of a running daemon")
    st.add_argument("--url", default=os.environ.get("HBMON_URL", DEFAULT_URL))
    st.add_argument("--json", action="store_true", help="print the raw /status.json")
    st.add_argument("--watch", action="store_true", help="refresh every second")

    vol = sub.add_parser("volume", help="install, inspect and retire heartbeat volumes")
    vsub = vol.add_subparsers(dest="action", required=True, parser_class=_Parser)
    init = _volume_command(vsub, "init", "install a heartbeat volume (write the first record)")
    init.add_argument("--id", required=True, help="pair identifier")
    init.add_argument("--slot", type=int, default=0)
    init.add_argument("--interval", default="1s", help="declared beat interval")
    init.add_argument("--force", action="store_true", help="overwrite foreign data in the slot")
    show = _volume_command(
        vsub, "show", "decode and validate the record(s) on a volume", announce=False
    )
    show.add_argument("--slot", type=int, help="only this slot (default: every non-zero slot)")
    show.add_argument("--id", help="expected pair identifier (identity check)")
    show.add_argument("--max-slots", type=int, default=1024, help="slots to scan (default 1024)")
    show.add_argument("--json", action="store_true")
    retire = _volume_command(vsub, "retire", "write a retired record (de-install)")
    retire.add_argument("--id", required=True)
    retire.add_argument("--slot", type=int, default=0)

    fo = sub.add_parser("failover", help="what an HbmonHostDown alert would do for a pair")
    fo.add_argument("pair")
    fo.add_argument("--dry-run", action="store_true", required=True, help="decide, do not act")
    fo.add_argument("--url", default=os.environ.get("HBMON_URL", DEFAULT_URL))

    demo = sub.add_parser("demo", help="a complete two-site lab on this machine (start here)")
    demo.add_argument("--pairs", type=int, default=8, help="pairs in all, half each way")
    demo.add_argument("--listen", default="127.0.0.1:9799", help="HOST:PORT of the first site")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--lag", type=float, default=50.0, help="remote copy lag in ms")
    demo.add_argument("--interval", default="1s", help="beat interval")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.add_argument(
        "--failover",
        help='failover command run on a guarded HbmonHostDown alert; "{pair}" is replaced '
        "(default: append to failovers.log in the demo folder)",
    )
    demo.add_argument(
        "--demote",
        help='demote command of each [[beat]] (with the arbiter); "{pair}" is replaced '
        "(default: append to demotes.log in the demo folder)",
    )
    demo.add_argument(
        "--etcd", default="etcd", help="etcd binary for the arbiter ('' runs the arbiter off)"
    )
    demo.add_argument("--webhook-token-file", help="bearer token file for the webhook")
    demo.add_argument("--hold-down", default="10m", help="failover hold-down per pair")

    lab = sub.add_parser("lab", help="fault injection against a running demo")
    lab.add_argument(
        "action",
        choices=[
            "kill-host",
            "freeze-host",
            "thaw-host",
            "cut-link",
            "partition",
            "corrupt",
            "hang-read",
            "truncate",
            "isolate-site",
            "cut-wan",
            "isolate-witness",
            "pause-site",
            "heal",
        ],
    )
    lab.add_argument(
        "pair",
        nargs="?",
        help="the pair (optional for cut-link and partition), or the SITE of isolate-site "
        "and pause-site",
    )
    lab.add_argument("seconds", nargs="?", type=float, help="pause-site: for how long")
    lab.add_argument("--url", help="the demo's URL (found automatically when one demo runs)")

    arb = sub.add_parser("arbiter", help="ownership at the arbiter (etcd)")
    asub = arb.add_subparsers(dest="action", required=True, parser_class=_Parser)
    astatus = asub.add_parser("status", help="who owns what: owners, terms, site leases")
    astatus.add_argument("-c", "--config", required=True, help="a site configuration")
    astatus.add_argument("--json", action="store_true")
    hand = asub.add_parser(
        "handover", help="planned handover or fail-back: the owner demotes, SITE takes over"
    )
    hand.add_argument("pair")
    hand.add_argument("--to", required=True, help="the site that takes the pair over")
    hand.add_argument("--url", default=os.environ.get("HBMON_URL", DEFAULT_URL),
                      help="the daemon of the site that owns the pair now")
    hand.add_argument("--token-file", required=True, help="the webhook's bearer token file")

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="action", required=True, parser_class=_Parser)
    check = csub.add_parser("check", help="validate a configuration and exit")
    check.add_argument("config")
    return p


def _volume_command(
    sub: Any, name: str, text: str, *, announce: bool = True
) -> argparse.ArgumentParser:
    """A ``hbmon volume`` subcommand with the arguments they all take."""
    cmd: argparse.ArgumentParser = sub.add_parser(name, help=text)
    cmd.add_argument("path")
    cmd.add_argument("--timeout", type=float, default=10.0, help="I/O deadline in seconds")
    if announce:
        cmd.add_argument(
            "-c",
            "--config",
            help="site configuration: announce to the [[beat]]'s peers over the network",
        )
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logs(args.log_format or "text", args.log_level)
        handler = _COMMANDS[args.command]
        return handler(args)
    except HbmonError as err:
        journal = "<3>" if on_journal(sys.stderr) else ""  # (an error, for journald too)
        print(f"{journal}hbmon: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


# -- run ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from hbmon.config import load_config, parse_hostport
    from hbmon.site import Site, run_daemon, threads_left_stuck

    config = load_config(args.config)
    # Now that the site is known: its log_format (unless --log-format), its name on
    # every structured line.
    setup_logs(args.log_format or config.log_format, args.log_level, static={"site": config.site})
    if args.listen:
        try:
            parse_hostport(args.listen)
        except ValueError as err:
            raise UsageError(f"--listen: {err}") from None
    site = Site(config, listen=args.listen)
    try:
        anyio.run(run_daemon, site, args.config)
    except OSError as err:
        raise HbmonError(f"cannot start site {config.site!r}: {err}") from None
    stuck = threads_left_stuck()
    if stuck:
        log.warning("%d I/O worker(s) still blocked in the kernel; exiting without them", stuck)
        logging.shutdown()
        os._exit(0)
    return 0


# -- status ---------------------------------------------------------------------------


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    target = url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            data: dict[str, Any] = json.load(resp)
            return data
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise HbmonError(
            f"cannot read {target}: {reason} (is `hbmon run` or `hbmon demo` running? "
            "pass --url or set HBMON_URL)"
        ) from None


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        doc = fetch_status(args.url)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            text = format_status(doc)
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(1.0)


# -- volume ---------------------------------------------------------------------------


def cmd_volume(args: argparse.Namespace) -> int:
    if args.slot is not None and args.slot < 0:
        raise UsageError(f"--slot {args.slot}: a slot number is 0 or more")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be more than 0 seconds")
    action = {"init": _volume_init, "show": _volume_show, "retire": _volume_retire}[args.action]
    return with_deadline(lambda: action(args), args.timeout, args.path)


def with_deadline(fn: Callable[[], int], seconds: float, path: str) -> int:
    """Run blocking volume I/O with a deadline: a hung device must not hang the CLI.

    The work runs on a daemon thread; if it has not finished in time the command fails
    and the process may exit while the thread stays blocked in the kernel.
    """
    result: list[int] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn())
        except BaseException as err:
            failure.append(err)

    worker = threading.Thread(target=work, name="hbmon volume I/O", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise VolumeError(path, f"no answer within {seconds:g} s (hung device or FIFO?)", "io_hung")
    if failure:
        raise failure[0]
    return result[0]


def _volume_init(args: argparse.Namespace) -> int:
    from hbmon.config import parse_duration
    from hbmon.record import check_pair_id

    try:
        check_pair_id(args.id)
        interval = parse_duration(args.interval)
    except ValueError as err:
        raise UsageError(str(err)) from None
    vol = open_volume(args.path, write=True, create=True)
    try:
        found = claim_slot(vol, args.slot, args.id, force=args.force)
        record = Record(args.id, 0, 0, time.time(), interval)
        write_slot(vol, args.slot, record.encode_block(vol.io_size))
    finally:
        vol.close()
    again = " (replacing its earlier record)" if found is not None else ""
    print(f"installed pair {args.id!r} in {args.path} slot {args.slot}{again}")
    return _announce(args, "activate", record)


def _volume_show(args: argparse.Namespace) -> int:
    from hbmon.errors import RecordError
    from hbmon.record import SLOT_SIZE, decode

    vol = open_volume(args.path)
    shown: list[dict[str, Any]] = []
    try:
        if args.slot is not None:
            slots: Sequence[int] = [args.slot]
        else:
            size = os.lseek(vol.fd, 0, os.SEEK_END)
            slots = range(min(args.max_slots, max(1, -(-size // SLOT_SIZE))))
        for slot in slots:
            data = read_slot(vol, slot)
            if args.slot is None and not any(data):
                continue
            entry: dict[str, Any] = {"slot": slot}
            try:
                rec = decode(data, args.id)
            except RecordError as err:
                entry.update(valid=False, reason=err.reason, detail=err.detail)
            else:
                entry.update(
                    valid=True,
                    pair=rec.pair_id,
                    state=rec.state.label,
                    serial=rec.serial,
                    incarnation=f"{rec.incarnation:016x}",
                    writer_time=rec.writer_time,
                    interval=rec.interval,
                )
            shown.append(entry)
    finally:
        vol.close()
    if args.json:
        print(json.dumps({"path": args.path, "records": shown}, indent=2))
    elif not shown:
        print(f"{args.path}: no heartbeat records (every slot scanned is zero)")
    for e in [] if args.json else shown:
        if e["valid"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["writer_time"]))
            print(
                f"slot {e['slot']}: pair {e['pair']} {e['state']} serial {e['serial']} "
                f"incarnation {e['incarnation']} written {when} interval {e['interval']}s"
            )
        else:
            print(f"slot {e['slot']}: INVALID {e['reason']}: {e['detail']}")
    return 0 if shown and all(e["valid"] for e in shown) else 1


def _volume_retire(args: argparse.Namespace) -> int:
    from hbmon.errors import RecordError
    from hbmon.record import State, decode

    vol = open_volume(args.path, write=True)
    try:
        try:
            old = decode(read_slot(vol, args.slot), args.id)
        except RecordError as err:
            raise VolumeError(
                args.path, f"slot {args.slot} holds no record of pair {args.id!r}: {err}"
            ) from None
        record = Record(
            args.id, old.incarnation, old.serial + 1, time.time(), old.interval, State.RETIRED
        )
        write_slot(vol, args.slot, record.encode_block(vol.io_size))
    finally:
        vol.close()
    print(f"retired pair {args.id!r} in {args.path} slot {args.slot} (serial {record.serial})")
    return _announce(args, "retire", record)


def _announce(args: argparse.Namespace, kind: str, record: Record) -> int:
    """Tell the watching site(s) over the network (install and de-install flows)."""
    if not args.config:
        return 0
    from hbmon.config import load_config
    from hbmon.netbeat import ACTIVATE, RETIRE, NetSender, load_secret, resolve_peers

    config = load_config(args.config)
    beat = next((b for b in config.beats if b.id == args.id), None)
    if beat is None or not beat.peers or config.network.key_file is None:
        raise UsageError(
            f"{args.config}: no [[beat]] with id {args.id!r}, peers and a network.key_file: "
            "nothing to announce to (the record is written)"
        )
    sender = NetSender(load_secret(config.network.key_file))
    try:
        peers = resolve_peers(beat.peers)
        # Sent once: if UDP loses it, the record on the mirrored volume says the same.
        errors = sender.send(ACTIVATE if kind == "activate" else RETIRE, record, peers)
    finally:
        sender.close()
    if errors:
        raise HbmonError(f"announcement not sent: {'; '.join(sorted(set(errors)))}")
    print(f"announced {kind} of pair {args.id!r} to {', '.join(beat.peers)}")
    return 0


# -- config ---------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from hbmon.config import load_config, warnings

    config = load_config(args.config)
    globs = ", ".join(g.pattern for g in config.watch_globs) or "none"
    arbiter = (
        f"arbiter {len(config.arbiter.endpoints)} endpoint(s), lease_ttl "
        f"{config.arbiter.timing.lease_ttl:g} s"
        if config.arbiter is not None
        else "no arbiter"
    )
    print(
        f"{args.config}: valid: site {config.site!r}, {len(config.beats)} beat(s), "
        f"{len(config.watches)} watch(es), watch_glob patterns: {globs}, {arbiter}"
    )
    for warning in warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# -- failover -------------------------------------------------------------------------


def ask_daemon(request: urllib.request.Request, timeout: float) -> Any:
    """The JSON answer of a running daemon; HbmonError naming the URL otherwise."""
    target = request.full_url
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise HbmonError(f"{target}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise HbmonError(f"cannot reach {target}: {err}") from None


def cmd_failover(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    target = f"{args.url.rstrip('/')}/api/v1/failover/{quote(args.pair, safe='')}"
    doc = ask_daemon(urllib.request.Request(target), 10)
    if doc["action"] == "failover":
        print(f"{args.pair}: an HbmonHostDown alert would run: {' '.join(doc['command'])}")
    else:
        print(f"{args.pair}: an HbmonHostDown alert would be refused")
    print(f"  because: {doc['reason']}")
    return 0


# -- arbiter --------------------------------------------------------------------------


def cmd_arbiter(args: argparse.Namespace) -> int:
    if args.action == "handover":
        return _handover(args)
    import anyio

    from hbmon.arbiter.etcd import EtcdStore
    from hbmon.arbiter.report import describe, format_description
    from hbmon.config import load_config

    config = load_config(args.config)
    if config.arbiter is None:
        raise UsageError(f"{args.config}: no [arbiter] table: this site has no arbiter")
    arbiter = config.arbiter

    async def ask() -> dict[str, Any]:
        store = EtcdStore.from_config(arbiter)
        try:
            return await describe(store)
        finally:
            await store.aclose()

    doc = anyio.run(ask)
    print(json.dumps(doc, indent=2) if args.json else format_description(doc))
    return 0


def _handover(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from hbmon.netbeat import load_secret

    token = load_secret(Path(args.token_file), "--token-file")
    target = f"{args.url.rstrip('/')}/api/v1/arbiter/handover/{quote(args.pair, safe='')}"
    body = json.dumps({"to": args.to}).encode()
    request = urllib.request.Request(
        target,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token.decode()}", "Content-Type": "application/json"},
    )
    doc = ask_daemon(request, 60)
    print(f"{args.pair}: handed over to {doc['site']} at term {doc['term']}")
    return 0


# -- demo and lab ---------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from hbmon.config import parse_duration, parse_hostport
    from hbmon.demo import DemoOptions, run_demo

    if args.pairs < 2:
        raise UsageError(f"--pairs {args.pairs}: the demo needs at least 2 pairs (one each way)")
    if args.duration is not None and args.duration <= 0:
        raise UsageError(f"--duration {args.duration}: must be more than 0 seconds")
    if not 0 <= args.lag <= 60_000:
        raise UsageError(f"--lag {args.lag}: milliseconds between 0 and 60000")
    try:
        parse_hostport(args.listen)
        interval = parse_duration(args.interval)
        hold_down = parse_duration(args.hold_down)
        failover = tuple(shlex.split(args.failover)) if args.failover else ()
        demote = tuple(shlex.split(args.demote)) if args.demote else ()
    except ValueError as err:
        raise UsageError(str(err)) from None
    opts = DemoOptions(
        pairs=args.pairs,
        listen=args.listen,
        duration=args.duration,
        lag=args.lag / 1000,
        interval=interval,
        keep=args.keep,
        failover=failover,
        demote=demote,
        etcd=args.etcd,
        webhook_token_file=Path(args.webhook_token_file) if args.webhook_token_file else None,
        hold_down=hold_down,
    )
    try:
        run_demo(opts, live=sys.stdout.isatty())
    except OSError as err:
        raise HbmonError(
            f"the demo could not start: {err} (is --listen {args.listen} free?)"
        ) from None
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from hbmon.lab import find_demo_url, lab_request

    url = args.url or find_demo_url()
    print(lab_request(url, args.action, args.pair, args.seconds))
    return 0


_COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "volume": cmd_volume,
    "config": cmd_config,
    "failover": cmd_failover,
    "arbiter": cmd_arbiter,
    "demo": cmd_demo,
    "lab": cmd_lab,
}

if __name__ == "__main__":
    sys.exit(main())
