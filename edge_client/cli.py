"""``fedprune-client``: run one edge client against a broker (no TensorFlow needed to start)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from fedprune import __version__, device_profiles
from fedprune.edge_client import data as local_data
from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.deploy import DeploymentReceiver
from fedprune.edge_client.local_training import peak_memory_mb
from fedprune.edge_client.service import DEFAULT_CONFIG, unit
from fedprune.edge_client.trainer import check_backend
from fedprune.edge_client.uplink import RESEND_AFTER, Identity
from fedprune.protocol.connection import Reminder, check_exposure
from fedprune.protocol.errors import ConfigError, FedpruneError, print_error
from fedprune.protocol.messages import COORDINATOR
from fedprune.protocol.options import (
    add_broker_arguments,
    add_config_argument,
    add_insecure_argument,
    at_least_one,
    broker_settings,
    name,
    parse_with_config,
    positive_seconds,
)
from fedprune.protocol.signing import Trust, load_signing_key, load_verify_key
from fedprune.protocol.transport import MqttTransport

PROG = "fedprune-client"

log = logging.getLogger("fedprune.client")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train on this device's private data in a fedprune run: receive the pruned "
        "global model over MQTT, train locally keeping pruned weights at zero, send a sparse "
        "update.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_argument(p, CONFIG_KEYS)
    add_broker_arguments(p)
    add_insecure_argument(p)
    p.add_argument(
        "--models",
        type=Path,
        default=Path("fedprune-models"),
        metavar="DIR",
        help="where the model deployed to this profile is installed, as DIR/PROFILE/model.tflite "
        "with its export.json (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("fedprune-cache"),
        metavar="DIR",
        help="where the device keeps what outlives a restart: the litert trainer's training "
        "artifacts, by SHA-256, so that each is downloaded once, a lossy codec's residual and "
        "SCAFFOLD's control variate (default: %(default)s)",
    )
    p.add_argument(
        "--no-deploy",
        action="store_true",
        help="do not fetch the model deployed at the end of the run",
    )
    p.add_argument(
        "--connect-attempts",
        type=at_least_one,
        default=5,
        metavar="N",
        help="tries to reach the broker before giving up, 0.5, 1, 2, 4... s apart (default: 5)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help=".npz with x (features) and y (integer labels); optional x_test/y_test (required, "
        "here or in --config)",
    )
    p.add_argument(
        "--profile",
        default=device_profiles.DEFAULT_PROFILE,
        help="device profile name (see fedprune-profiles list) or path to a .toml",
    )
    p.add_argument(
        "--run", type=name, default="default", help="run name, as given to the coordinator"
    )
    p.add_argument(
        "--id",
        dest="client_id",
        type=name,
        default=None,
        help="client id (default: hostname plus data file name)",
    )
    p.add_argument("--trainer", default=None, help="trainer backend (default: the profile's)")
    p.add_argument(
        "--signing-key",
        metavar="FILE",
        help="this device's Ed25519 signing key: its hello, status and updates are signed",
    )
    p.add_argument(
        "--coordinator-key",
        metavar="FILE",
        help="the coordinator's verify key: messages it did not sign are dropped",
    )
    p.add_argument(
        "--epochs",
        type=at_least_one,
        default=None,
        help="local epochs per round (default: what the coordinator announces)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and the held-out split")
    p.add_argument(
        "--forever",
        action="store_true",
        help="keep serving: when the run ends, wait for its next start (a device as a service; "
        "stop it with SIGTERM)",
    )
    p.add_argument(
        "--systemd-unit",
        action="store_true",
        help="print a systemd unit that runs this client with --config (default "
        f"{DEFAULT_CONFIG}) as a service, then exit (docs/raspberry-pi.md)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: run until the coordinator ends)",
    )
    p.add_argument(
        "--resend-after",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="send an update again when the coordinator has not answered it this long after it "
        "was sent, then after twice as long, while its round lasts (default: half the round's "
        f"duration, at least {RESEND_AFTER:g})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


CONFIG_KEYS = {  # key in a device's config file: (argparse dest, is a path)
    "broker": ("broker", False),
    "ca": ("ca", True),
    "cert": ("cert", True),
    "key": ("key", True),
    "credentials": ("credentials", True),
    "run": ("run", False),
    "id": ("client_id", False),
    "profile": ("profile", False),
    "data": ("data", True),
    "models": ("models", True),
    "cache": ("cache", True),
    "trainer": ("trainer", False),
    "forever": ("forever", False),
    "signing_key": ("signing_key", True),
    "coordinator_key": ("coordinator_key", True),
    "resend_after": ("resend_after", False),
    "insecure": ("insecure", False),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Flags over the ``--config`` file over the built-in defaults."""
    p = parser()
    if "--systemd-unit" in (sys.argv[1:] if argv is None else argv):
        return p.parse_args(argv)  # the config file is named in the unit, not read
    args = parse_with_config(p, argv, CONFIG_KEYS)
    if args.data is None:
        p.error("the following arguments are required: --data (or data = ... in --config)")
    return args


@contextlib.contextmanager
def _status_line() -> Iterator[Callable[[str], None] | None]:
    """A live line saying what the device does, on a terminal where rich is installed (the
    ``monitor`` extra); elsewhere nothing: the log lines say it all."""
    if not sys.stderr.isatty() or importlib.util.find_spec("rich") is None:
        yield None
        return
    from fedprune.edge_client.terminal import status_line

    with status_line() as show:
        yield show


class Stop(threading.Event):
    """A request to leave: SIGTERM (``systemctl stop``, a shutdown; exit 0) or Ctrl-C (SIGINT;
    exit 130). The loop ends after its current step and the device leaves cleanly, saying offline
    first. The handler only sets this flag: an exception raised from it (KeyboardInterrupt) could
    land inside a lock's wait and leave the lock broken, a traceback instead of an exit. A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = ""
        self.code = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signal, self.code = signal.Signals(signum).name, 0
        if signum == signal.SIGINT:
            self.code = 130
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.set()


def main(argv: list[str] | None = None) -> int:
    stopping = Stop()
    previous = {s: signal.signal(s, stopping) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv, stopping)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str] | None, stopping: Stop) -> int:
    try:
        args = parse(argv)
    except ConfigError as exc:
        return print_error(PROG, exc)
    if args.systemd_unit:
        print(unit((args.config or DEFAULT_CONFIG).absolute()), end="")
        return 0
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        profile = device_profiles.load(args.profile)
        data = local_data.load(args.data, seed=args.seed)
        backend = args.trainer or profile.trainer.value
        check_backend(backend)
        if bool(args.signing_key) != bool(args.coordinator_key):
            raise ConfigError("signed operation needs both --signing-key and --coordinator-key")
        signer = load_signing_key(args.signing_key) if args.signing_key else None
        trust = (
            Trust.of({COORDINATOR: load_verify_key(args.coordinator_key)}) if signer else Trust()
        )
        identity = Identity(
            signer=signer,
            run=args.run,
            client_id=args.client_id
            or re.sub(r"[^\w.-]", "-", f"{socket.gethostname()}-{args.data.stem}"),
            profile=profile.name,
            num_samples=data.num_samples,
            backend=backend,
            max_payload=profile.max_payload_bytes,
        )
        settings = broker_settings(args)
        exposed = check_exposure(settings, signed=signer is not None, insecure=args.insecure)
        transport = MqttTransport(
            settings,
            client_id=identity.client_id,
            will=identity.will(),
            max_payload=profile.max_payload_bytes,
            connect_attempts=args.connect_attempts,
        )
        receiver = None
        if not args.no_deploy:
            receiver = DeploymentReceiver(args.models / profile.name, sample=data.x_test[:8])
        client = EdgeClient(
            transport,
            identity=identity,
            data=data,
            local_epochs=args.epochs,
            seed=args.seed,
            deploy=receiver,
            cache=args.cache,
            trust=trust,
            profile=profile,
            resend_after=args.resend_after,
            remind=None if exposed is None else Reminder(log, exposed),
        )
        try:
            with _status_line() as show:
                client.show = show
                stats = client.run(timeout=args.timeout, forever=args.forever, stop=stopping)
        finally:
            # A clean disconnect discards the last will: say "offline" ourselves, so that the
            # coordinator does not keep selecting a device that has gone.
            with contextlib.suppress(FedpruneError):
                transport.publish(*identity.will(), retain=True)
            transport.flush(timeout=5)
            transport.close()
    except (FedpruneError, device_profiles.ProfileError, OSError) as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 130
    if stopping.is_set():
        log.info("stopped (%s); said offline to the broker", stopping.signal)
        return stopping.code
    log.info(
        "done: %d round(s), %d bytes sent, %d bytes received, peak memory %.1f MB, TensorFlow"
        " loaded: %s",
        len(stats.rounds),
        stats.bytes_up,
        stats.bytes_down,
        peak_memory_mb(),
        "yes" if "tensorflow" in sys.modules else "no",
    )
    return 0 if stats.finished and not stats.aborted else 1


if __name__ == "__main__":
    sys.exit(main())
