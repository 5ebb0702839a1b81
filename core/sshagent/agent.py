"""The agent's protocol state and dispatch: which keys it offers, the keys clients added, the
lock, and one answer per request. The socket side is in server.py.

Every key operation goes through `KeyAPI` (a `Keystore` in process, or a `RemoteKeystore`
talking to `strongroom serve`); the agent holds no private key and no key logic.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..api import KeyAPI, requester
from ..audit import current_principal
from ..errors import (
    AgentMessageError,
    AuthenticationFailed,
    KeyExists,
    PolicyViolation,
    StrongroomError,
)
from . import keys, policy, wire

log = logging.getLogger("strongroom.sshagent")

MAX_SESSION_BINDS = 16
"""session-bind@openssh.com messages kept per connection (OpenSSH's agent keeps as many)."""
EXTENSIONS = ("query", "session-bind@openssh.com")


@dataclass(frozen=True)
class AgentSettings:
    """What the agent offers and allows: `[ssh_agent]` in the config, or the command line."""

    patterns: tuple[str, ...] = ()
    """Glob patterns over key names (fnmatch, case-sensitive): the keys offered."""
    allow_add: bool = False
    """Whether ADD_IDENTITY imports the key into the keystore (else it is refused)."""
    add_backend: str | None = None
    """The backend added keys are imported into (None: the keystore's choice)."""
    confirm: tuple[str, ...] = ()
    """Glob patterns over key names: each signature with such a key is confirmed first."""
    askpass: str | None = None
    """The program that asks for a confirmation (OpenSSH's SSH_ASKPASS convention: the
    prompt as its argument, SSH_ASKPASS_PROMPT=confirm, exit status 0 for yes)."""
    policies: tuple[policy.KeyPolicy, ...] = ()
    """Per-key policy (`[ssh_agent.policy."PATTERN"]`): every policy whose pattern matches a
    key's name applies to it."""
    revoked_host_keys: frozenset[bytes] = frozenset()
    """Host key blobs the known_hosts files read at start mark `@revoked`: a destination
    constraint (ssh-add -h) never matches them, bare, as a host certificate's key or as
    its CA."""

    def other_uids(self) -> frozenset[int]:
        """Uids besides the agent's own and root that some key's policy lets connect."""
        return frozenset(u for p in self.policies for u in (p.allowed_uids or ()))


ASKPASS_TIMEOUT = 120.0
"""Seconds a confirmation may stay unanswered; then the signature is refused."""


@dataclass(frozen=True)
class AddedKey:
    """A key a client added, with the constraints it asked for."""

    confirm: bool = False
    expires: float | None = None
    """time.monotonic() after which the agent forgets the key (the lifetime constraint)."""
    destinations: tuple[policy.Destination, ...] = ()
    """Where the key may be used (`ssh-add -h`); empty: anywhere."""


@dataclass(frozen=True)
class _Rules:
    """What the configuration says of one key name: confirmation (`[ssh_agent] confirm`, a
    policy's `confirm`), and the `allowed_uids` and `allowed_hosts` of every policy whose
    pattern matches it (each list must allow a use)."""

    confirm: bool
    uids: tuple[frozenset[int], ...]
    hosts: tuple[policy.KeyPolicy, ...]
    """The policies that name `allowed_hosts`."""

    @property
    def restricted(self) -> bool:
        """Whether any of it applies (else only the default uid rule does)."""
        return self.confirm or bool(self.uids) or bool(self.hosts)


_MAX_RULES = 65536


@dataclass(frozen=True)
class Binding:
    """One verified session-bind@openssh.com: the host key and the session it signed."""

    host_key: bytes
    session_id: bytes
    forwarding: bool


@dataclass
class Peer:
    """One client connection: who is on the other end, and the sessions it bound."""

    pid: int
    uid: int
    bindings: list[Binding] = field(default_factory=list)
    bind_failed: bool = False
    """A session-bind on this connection did not verify: keys restricted to hosts are
    refused on it from then on (the client may be lying about where it is)."""
    _actor: str | None = None

    @property
    def actor(self) -> str:
        """Who the keystore's audit record names for a signature on this connection: the
        peer and, once the client bound the connection to a session, the host it is
        signing in to."""
        if self._actor is None:
            destination = self.destination()
            self._actor = f"ssh-agent[uid={self.uid} pid={self.pid}" + (
                f" dest={destination}]" if destination else "]"
            )
        return self._actor

    def executable(self) -> str:
        """The peer's program (/proc/PID/exe), for a confirmation prompt."""
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return "(unknown program)"

    def hops(self) -> list[tuple[bytes, bool]]:
        """The host keys the connection was bound to, in order, each with its forwarding
        flag: this machine's ssh, then any hosts the agent was forwarded through."""
        return [(b.host_key, b.forwarding) for b in self.bindings]

    def destination(self) -> str | None:
        """The fingerprint of the host the connection last authenticated to, if bound."""
        for binding in reversed(self.bindings):
            if not binding.forwarding:
                return keys.host_key_fingerprint(binding.host_key)
        return None


class Agent:
    """The protocol state every connection shares (thread-safe: one lock around it)."""

    def __init__(self, ks: KeyAPI, settings: AgentSettings) -> None:
        self.ks = ks
        self.settings = settings
        self._lock = threading.Lock()
        self._by_blob: dict[bytes, keys.Identity] = {}
        self._blob_cache: dict[tuple[str, int], bytes] = {}
        self._added: dict[str, AddedKey] = {}
        """Keys clients added, by name: the only ones REMOVE_IDENTITY forgets."""
        self._applications: dict[str, str] | None = None
        """The OpenSSH application of each fido backend's credentials (its rp_id)."""
        self._lock_mac: bytes | None = None
        self._lock_key = os.urandom(32)
        self._failed_unlocks = 0
        self._own_uids = (os.getuid(), 0)
        self._rules: dict[str, _Rules] = {}
        """What the configuration says of each key name, worked out once (the settings
        never change): the signing path does no pattern matching."""

    # -- the keys offered ------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        return name in self._added or any(
            fnmatch.fnmatchcase(name, p) for p in self.settings.patterns
        )

    def _expire(self) -> None:
        """Forget added keys whose lifetime is over (checked whenever keys are looked up)."""
        if not self._added:  # the common case, and the signing hot path: nothing to expire
            return
        now = time.monotonic()
        with self._lock:
            for name in [n for n, a in self._added.items() if a.expires and a.expires <= now]:
                del self._added[name]
                self._by_blob = {b: i for b, i in self._by_blob.items() if i.name != name}

    def _application(self, backend: str) -> str | None:
        """The OpenSSH application FIDO keys of `backend` were made for: its rp_id, when it
        is one (`ssh:`...); None for a backend that makes WebAuthn credentials, whose keys
        the agent does not offer (OpenSSH could not verify them). Asked once."""
        if self._applications is None:
            self._applications = {
                b.name: str(b.details.get("rp_id", ""))
                for b in self.ks.backends()
                if b.type == "fido"
            }
        return keys.ssh_application(self._applications.get(backend))

    def identities(self, *, strict: bool = False) -> list[keys.Identity]:
        """The keys offered now, read afresh from the keystore (rotations, new keys).

        A key whose public key cannot be read (a token unplugged) is left out and logged, so
        that it does not hide the others; with `strict` (the agent's start, where a wrong
        passphrase or token must stop it rather than leave it offering nothing) the error
        is raised."""
        found: list[keys.Identity] = []
        self._expire()
        for info in self.ks.keys():
            if not (keys.offerable(info) and self._wanted(info.name)):
                continue
            application = self._application(info.backend) if info.type.is_fido else None
            if info.type.is_fido and application is None:
                continue
            cache_key = (info.name, info.version)
            blob = self._blob_cache.get(cache_key)
            if blob is None:
                try:
                    blob = keys.key_blob(self.ks.public_key(info.name), application)
                except StrongroomError as e:
                    if strict:
                        raise
                    log.warning("key %s is not offered: %s", info.name, type(e).__name__)
                    continue
                self._blob_cache[cache_key] = blob
            found.append(keys.Identity(blob, info.name, info.type, application))
        with self._lock:
            self._by_blob = {i.blob: i for i in found}
        return found

    def _identity(self, blob: bytes) -> keys.Identity | None:
        self._expire()
        identity = self._by_blob.get(blob)
        if identity is None:  # a key added or made since the client last listed
            identity = next((i for i in self.identities() if i.blob == blob), None)
        return identity

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, body: bytes, peer: Peer) -> bytes:
        """The reply frame to one message body. Never raises: a refusal, bad input or a bug
        is SSH_AGENT_FAILURE, logged by its class name only (no key material, no data)."""
        try:
            request = wire.decode(body)
            return self._dispatch(request, peer)
        except StrongroomError as e:
            log.info("request refused (peer pid %d): %s", peer.pid, type(e).__name__)
        except Exception as e:  # a bug must not take the agent or other clients down
            log.error("request failed (peer pid %d): %s", peer.pid, type(e).__name__)
        return wire.FAILURE_FRAME

    def _dispatch(self, request: wire.Request, peer: Peer) -> bytes:
        if isinstance(request, wire.Unlock):
            return self._unlock(request.passphrase)
        if self._lock_mac is not None:  # locked: an empty key list, every other request fails
            if isinstance(request, wire.RequestIdentities):
                return wire.identities_answer([])
            return wire.FAILURE_FRAME
        match request:
            case wire.RequestIdentities():
                listed = [i for i in self.identities() if self._listed(i, peer)]
                return wire.identities_answer([(i.blob, i.name) for i in listed])
            case wire.SignRequest():
                return self._sign(request, peer)
            case wire.AddIdentity():
                return self._add(request)
            case wire.RemoveIdentity():
                return self._remove(request.key_blob)
            case wire.RemoveAllIdentities():
                with self._lock:
                    self._added.clear()
                return wire.SUCCESS_FRAME
            case wire.Lock():
                with self._lock:
                    self._lock_mac = self._mac(request.passphrase)
                return wire.SUCCESS_FRAME
            case wire.Extension():
                return self._extension(request, peer)
        return wire.FAILURE_FRAME  # wire.Unsupported: smartcard keys, unknown types

    def _sign(self, request: wire.SignRequest, peer: Peer) -> bytes:
        identity = self._identity(request.key_blob)
        if identity is None:
            return wire.FAILURE_FRAME
        ssh_name, algorithm = keys.sign_algorithm(identity, request.flags)
        rules = self._rules_of(identity.name)
        if identity.name in self._added or rules.restricted or peer.bindings:
            login = policy.login_request(request.data)
            self._permit(identity, peer, login)
            if self._needs_confirmation(identity.name):
                self._confirm(identity, peer, login)
        elif peer.uid not in self._own_uids:
            # The common case, decided as `_permit` would: a configured key that no policy
            # restricts or confirms, on a connection bound to no session (so there is no
            # login to check against one), used by the agent's own user or root.
            raise PolicyViolation(f"this key may not be used by uid {peer.uid}")
        # The audit record names peer and host: in process as its actor; through the
        # service beside the token's identity (a RemoteKeystore sends the requester note).
        token = current_principal.set(peer.actor)
        note = requester.set(peer.actor)
        notice = self._presence_notice(identity, peer) if identity.application else None
        try:
            signature = self.ks.sign(identity.name, request.data, algorithm)
        finally:
            requester.reset(note)
            current_principal.reset(token)
            if notice is not None:
                _close_notice(notice)
        if identity.application is not None:  # a FIDO key: its assertion, the OpenSSH way
            return wire.sign_response(keys.sk_signature(identity, signature))
        return wire.sign_response(keys.ssh_signature(identity.key_type, ssh_name, signature))

    def _add(self, request: wire.AddIdentity) -> bytes:
        if not self.settings.allow_add:
            raise PolicyViolation("adding keys is not allowed ([ssh_agent] allow_add)")
        confirm, expires = False, None
        destinations: tuple[policy.Destination, ...] = ()
        for code, data in request.constraints:
            if code == wire.CONSTRAIN_LIFETIME:
                expires = time.monotonic() + wire.Reader(data).uint32()
            elif code == wire.CONSTRAIN_CONFIRM:
                confirm = True
            else:
                extension = wire.Reader(data)
                if extension.name() != wire.RESTRICT_DESTINATION or destinations:
                    # A constraint the agent cannot keep: accepting the key while ignoring
                    # it would grant more than was asked.
                    raise PolicyViolation("this key constraint is not supported")
                destinations = policy.destination_constraints(
                    extension.string(), self.settings.revoked_host_keys
                )
        added = AddedKey(confirm, expires, destinations)
        key_type, der, blob = keys.added_key(request)
        name = keys.added_key_name(blob)
        try:
            try:
                self.ks.import_key(name, key_type, der, self.settings.add_backend, format="der")
            except KeyExists:  # added before: the name is the public key's hash
                if keys.key_blob(self.ks.public_key(name)) != blob:
                    raise
        finally:
            der[:] = bytes(len(der))
        with self._lock:
            self._added[name] = added
        return wire.SUCCESS_FRAME

    def _remove(self, blob: bytes) -> bytes:
        identity = self._identity(blob)
        with self._lock:
            if identity is None or identity.name not in self._added:
                return wire.FAILURE_FRAME  # keystore keys are offered by config, not removed
            del self._added[identity.name]
            self._by_blob.pop(blob, None)
        return wire.SUCCESS_FRAME

    # -- who may sign, and where ------------------------------------------------------------------
    def _rules_of(self, name: str) -> _Rules:
        """The configuration's rules for a key name (every matching policy, and
        `[ssh_agent] confirm`), from the cache."""
        rules = self._rules.get(name)
        if rules is None:
            policies = [p for p in self.settings.policies if fnmatch.fnmatchcase(name, p.pattern)]
            rules = _Rules(
                confirm=any(fnmatch.fnmatchcase(name, c) for c in self.settings.confirm)
                or any(p.confirm for p in policies),
                uids=tuple(p.allowed_uids for p in policies if p.allowed_uids is not None),
                hosts=tuple(p for p in policies if p.allowed_hosts is not None),
            )
            if len(self._rules) >= _MAX_RULES:  # names come from the keystore; bound anyway
                self._rules.clear()
            self._rules[name] = rules
        return rules

    def _uid_allowed(self, name: str, uid: int) -> bool:
        """The peer uids of every policy that lists some, else the agent's own and root."""
        listed = self._rules_of(name).uids
        if not listed:
            return uid in self._own_uids
        return all(uid in uids for uids in listed)

    def _restrictions(
        self, name: str
    ) -> tuple[tuple[policy.Destination, ...], tuple[policy.KeyPolicy, ...]]:
        """The key's destination constraints (ssh-add -h) and its policies' allowed_hosts."""
        added = self._added.get(name)
        return (added.destinations if added else ()), self._rules_of(name).hosts

    @staticmethod
    def _hosts_allow(allowed: policy.KeyPolicy, peer: Peer) -> bool:
        return all(allowed.allows_host(host_key) for host_key, _ in peer.hops())

    def _listed(self, identity: keys.Identity, peer: Peer) -> bool:
        """Whether REQUEST_IDENTITIES shows the key to this connection. Like OpenSSH's
        agent, a key restricted to hosts is listed on a connection bound only to hosts it
        may be used with, and on an unbound one (local use: `ssh-add -L`)."""
        if not self._uid_allowed(identity.name, peer.uid):
            return False
        destinations, hosts = self._restrictions(identity.name)
        if not destinations and not hosts:
            return True
        if peer.bind_failed:
            return False
        if destinations and not policy.destinations_allow(destinations, peer.hops(), None):
            return False
        return all(self._hosts_allow(allowed, peer) for allowed in hosts)

    def _permit(self, identity: keys.Identity, peer: Peer, login: policy.Login | None) -> None:
        """Refuse a signature the key's policy or constraints do not allow (PolicyViolation).

        Every login on a connection bound for authentication must be for the session bound
        last, and name its host key, whatever the key: a client cannot have a login to one
        host signed while bound to another. A key restricted to hosts (ssh-add -h, or
        allowed_hosts) signs only logins, on a bound connection, to hosts it allows."""
        if not self._uid_allowed(identity.name, peer.uid):
            raise PolicyViolation(f"this key may not be used by uid {peer.uid}")
        last = peer.bindings[-1] if peer.bindings else None
        if login is not None and last is not None and not last.forwarding:
            if login.session_id != last.session_id:
                raise PolicyViolation("the login is for another session than the one bound")
            if login.host_key is not None and login.host_key != last.host_key:
                raise PolicyViolation("the login names another host key than the one bound")
        destinations, hosts = self._restrictions(identity.name)
        if not destinations and not hosts:
            return
        if login is None:
            raise PolicyViolation("this key is restricted to hosts: it signs SSH logins only")
        if last is None or peer.bind_failed:
            raise PolicyViolation("this key is restricted to hosts, and the connection is unbound")
        if login.key_blob != identity.blob or login.session_id != last.session_id:
            raise PolicyViolation("the login does not match the key or the bound session")
        if len(peer.bindings) > 1 and login.host_key is None:
            raise PolicyViolation("a login through a forwarded agent must name its host key")
        if destinations and not policy.destinations_allow(destinations, peer.hops(), login.user):
            raise PolicyViolation("the key's destination constraints do not allow this host")
        if not all(self._hosts_allow(allowed, peer) for allowed in hosts):
            raise PolicyViolation("the key's allowed_hosts do not include this host")

    # -- confirmation -----------------------------------------------------------------------------
    def _needs_confirmation(self, name: str) -> bool:
        added = self._added.get(name)
        return (added is not None and added.confirm) or self._rules_of(name).confirm

    def _confirm(self, identity: keys.Identity, peer: Peer, login: policy.Login | None) -> None:
        """Ask the user through the askpass program; refuse unless it says yes (exit 0)."""
        askpass = self.settings.askpass
        if not askpass:
            raise PolicyViolation("the key needs a confirmation, and SSH_ASKPASS is not set")
        destination = peer.destination()
        prompt = (
            f"Allow use of key {identity.name}?\n"
            f"Key fingerprint {keys.fingerprint(identity.blob)}\n"
            f"Requested by pid {peer.pid} (uid {peer.uid}): {peer.executable()}\n"
            + (f"Destination host key {destination}\n" if destination else "")
            + (
                f"For an SSH login as {login.user!r}\n"
                if login is not None
                else "For a signature that is not an SSH login (a file, a git commit, ...)\n"
            )
        )
        answer = _run_askpass(askpass, prompt, {**os.environ, "SSH_ASKPASS_PROMPT": "confirm"})
        if answer is None:
            raise PolicyViolation("the confirmation could not be asked")
        if answer.returncode != 0:
            raise PolicyViolation("the user did not confirm the signature")

    def _presence_notice(
        self, identity: keys.Identity, peer: Peer
    ) -> subprocess.Popen[bytes] | None:
        """While a FIDO key waits for its touch, say so through the askpass program, as
        OpenSSH's agent does (SSH_ASKPASS_PROMPT=none: a notice, no answer); closed once
        the signature is made or refused. The keystore's own "touch your security key"
        goes to stderr. A notice that cannot be shown does not stop the signature."""
        askpass = self.settings.askpass
        if not askpass:
            return None
        prompt = (
            f"Confirm user presence for key {identity.name}\n"
            f"Key fingerprint {keys.fingerprint(identity.blob)}\n"
            f"Requested by pid {peer.pid} (uid {peer.uid}): {peer.executable()}\n"
        )
        try:
            return subprocess.Popen(
                [askpass, prompt],
                env={**os.environ, "SSH_ASKPASS_PROMPT": "none"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            log.info("the presence notice could not be shown (peer pid %d)", peer.pid)
            return None

    # -- lock -------------------------------------------------------------------------------------
    def _mac(self, passphrase: bytes) -> bytes:
        return hmac.new(self._lock_key, passphrase, hashlib.sha256).digest()

    def _unlock(self, passphrase: bytes) -> bytes:
        with self._lock:
            if self._lock_mac is None:
                return wire.FAILURE_FRAME
            if hmac.compare_digest(self._lock_mac, self._mac(passphrase)):
                self._lock_mac = None
                self._failed_unlocks = 0
                return wire.SUCCESS_FRAME
            self._failed_unlocks += 1
            delay = min(self._failed_unlocks, 10) * 0.1
        time.sleep(delay)  # slows guessing; only this connection waits
        return wire.FAILURE_FRAME

    @property
    def locked(self) -> bool:
        return self._lock_mac is not None

    # -- extensions -------------------------------------------------------------------------------
    def _extension(self, request: wire.Extension, peer: Peer) -> bytes:
        if request.name == "query":
            if request.contents:
                return wire.FAILURE_FRAME
            return wire.extension_response("query", b"".join(wire.string(e) for e in EXTENSIONS))
        if request.name == "session-bind@openssh.com":
            self._session_bind(request.contents, peer)
            return wire.SUCCESS_FRAME
        return wire.FAILURE_FRAME

    def _session_bind(self, contents: bytes, peer: Peer) -> None:
        try:
            bind = wire.session_bind(contents)
            keys.verify_session_signature(bind.host_key, bind.session_id, bind.signature)
        except AgentMessageError:
            peer.bind_failed = True
            raise
        host_key, session_id, forwarding = bind.host_key, bind.session_id, bind.forwarding
        if any(b.session_id == session_id for b in peer.bindings):
            raise PolicyViolation("this session is already bound to the connection")
        if any(not b.forwarding for b in peer.bindings):
            raise PolicyViolation("the connection was already bound for authentication")
        if len(peer.bindings) >= MAX_SESSION_BINDS:
            raise PolicyViolation("too many sessions bound to one connection")
        peer.bindings.append(Binding(host_key, session_id, forwarding))
        peer._actor = None  # the destination changed


def _run_askpass(
    askpass: str, prompt: str, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes] | None:
    """Run the askpass program with the prompt as its argument and no input; its exit
    status and output are the caller's to read. None when it cannot be started or does
    not answer within ASKPASS_TIMEOUT."""
    try:
        return subprocess.run(
            [askpass, prompt],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=ASKPASS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def askpass_prompter(askpass: str) -> Callable[[str, bool], str]:
    """A keystore prompter (`strongroom.open(prompter=...)`) that asks through an askpass
    program the way OpenSSH's tools do for a passphrase: the prompt as its argument, no
    SSH_ASKPASS_PROMPT, the answer on its standard output (one trailing newline removed),
    exit status 0. Cancelled, failed or unanswered (120 s): AuthenticationFailed. The
    answer is asked once per call; what the keystore does with a wrong one is the
    backend's (a refused hardware PIN is never sent again)."""

    def ask_once(prompt: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "SSH_ASKPASS_PROMPT"}
        answer = _run_askpass(askpass, prompt, env)
        if answer is None:
            raise AuthenticationFailed(f"{prompt.rstrip(': ')}: askpass did not answer")
        if answer.returncode != 0:
            raise AuthenticationFailed(f"{prompt.rstrip(': ')}: cancelled at the askpass prompt")
        raw = answer.stdout
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        return raw.removesuffix(b"\r").decode("utf-8", "replace")

    def ask(prompt: str, confirm: bool) -> str:
        value = ask_once(prompt)
        if confirm and ask_once("Again: " + prompt) != value:
            raise AuthenticationFailed(f"{prompt.rstrip(': ')}: the two entries differ")
        return value

    return ask


def _close_notice(notice: subprocess.Popen[bytes]) -> None:
    """End an askpass notice and reap it (killed if it ignores SIGTERM)."""
    notice.terminate()
    try:
        notice.wait(timeout=5)
    except subprocess.TimeoutExpired:
        notice.kill()
        notice.wait()


def patterns_from(values: Iterable[str]) -> tuple[str, ...]:
    """Patterns as given (command line or config), without empty ones."""
    return tuple(v for v in values if v)
