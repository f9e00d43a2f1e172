"""CURVE encryption and authentication for every socket (layer 3: imports config, errors).

The rule it keeps: fail closed. With CURVE on, every bound socket is a CURVE
server whose ZAP domain is enforced (``ZAP_ENFORCE_DOMAIN``) against an
allow-list directory of public keys; a missing or empty allow-list refuses to
start. There is no "allow any".

Key directory layout (made by ``zfabric keys DIR``)::

    DIR/scheduler.key, scheduler.key_secret      the scheduler's keypair
    DIR/worker.key,    worker.key_secret         a worker keypair
    DIR/client.key,    client.key_secret         a client keypair
    DIR/allowed/clients/*.key   may submit tasks (scheduler intake)
    DIR/allowed/workers/*.key   may join as workers (scheduler ROUTER)
    DIR/allowed/fabric/*.key    may push into a client's sink (scheduler, workers)

A sink's public key travels inside its address: ``tcp://IP:PORT#curve=<z85>``,
so workers can authenticate the sink they push results to.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import CurveConfig
from .errors import ConfigError

DOMAINS = ("clients", "workers", "fabric")
_KEY_MARK = "#curve="


def generate_keys(keys_dir: str, names: tuple[str, ...] = ("scheduler", "worker", "client")) -> list[str]:
    """Create keypairs (secret files 0600) and the allow-lists; returns the files written."""
    os.makedirs(keys_dir, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(keys_dir, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    roles = {"clients": ["client"], "workers": ["worker"], "fabric": ["scheduler", "worker"]}
    for domain, members in roles.items():
        folder = os.path.join(keys_dir, "allowed", domain)
        os.makedirs(folder, exist_ok=True)
        for name in members:
            if name in names:
                dest = os.path.join(folder, f"{name}.key")
                shutil.copyfile(os.path.join(keys_dir, f"{name}.key"), dest)
                written.append(dest)
    return written


def split_sink(address: str) -> tuple[str, bytes | None]:
    """``tcp://IP:PORT#curve=KEY`` -> (endpoint, server key or None)."""
    endpoint, mark, key = address.partition(_KEY_MARK)
    return endpoint, (key.encode() if mark else None)


class Curve:
    """One process's CURVE material and its ZAP handler."""

    _lock = threading.Lock()
    _auth: ThreadAuthenticator | None = None
    _domains: set[str] = set()

    def __init__(self, config: CurveConfig, default_name: str) -> None:
        self.keys_dir = config.keys_dir
        name = config.name or default_name
        secret_file = os.path.join(self.keys_dir, f"{name}.key_secret")
        if not os.path.exists(secret_file):
            raise ConfigError(f"CURVE: no secret key {secret_file}; create keys with `zfabric keys {self.keys_dir}`")
        if os.stat(secret_file).st_mode & 0o077:
            raise ConfigError(f"CURVE: {secret_file} is readable by others; chmod 600 it")
        self.public, self.secret = zmq.auth.load_certificate(secret_file)
        if self.secret is None:
            raise ConfigError(f"CURVE: {secret_file} holds no secret key")

    @property
    def scheduler_key(self) -> bytes:
        path = os.path.join(self.keys_dir, "scheduler.key")
        if not os.path.exists(path):
            raise ConfigError(f"CURVE: the scheduler's public key {path} is missing")
        return zmq.auth.load_certificate(path)[0]

    def allowed_dir(self, domain: str) -> str:
        folder = os.path.join(self.keys_dir, "allowed", domain)
        if not glob.glob(os.path.join(folder, "*.key")):
            raise ConfigError(f"CURVE: the allow-list {folder} is missing or empty; refusing to start "
                              "(it would admit nobody, and zfabric never admits anybody)")
        return folder

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` a CURVE server admitting only keys in the `domain` allow-list."""
        folder = self.allowed_dir(domain)
        self._start_authenticator(sock.context, domain, folder)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = domain.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def connect_to(self, sock: zmq.Socket, server_key: bytes) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server_key

    def sink_address(self, endpoint: str) -> str:
        return f"{endpoint}{_KEY_MARK}{self.public.decode()}"

    @classmethod
    def _start_authenticator(cls, context: zmq.Context, domain: str, folder: str) -> None:
        with cls._lock:
            if cls._auth is None:
                cls._auth = ThreadAuthenticator(context)
                cls._auth.start()
            if domain not in cls._domains:
                cls._auth.configure_curve(domain=domain, location=folder)
                cls._domains.add(domain)


def check_versions() -> None:
    """Refuse libzmq < 4.3.3 (CVE-2020-15166 and others) and msgpack < 1.2.1."""
    import msgpack

    if zmq.zmq_version_info() < (4, 3, 3):
        raise ConfigError(f"libzmq {zmq.zmq_version()} is too old: zfabric needs 4.3.3 or newer "
                          "(CVE-2020-15166). Upgrade pyzmq (`pip install -U pyzmq`), which bundles a current libzmq.")
    if msgpack.version < (1, 2, 1):
        raise ConfigError(f"msgpack {'.'.join(map(str, msgpack.version))} is too old: zfabric needs 1.2.1 or newer "
                          "(a crash when an Unpacker is reused after an error). `pip install -U msgpack`.")
