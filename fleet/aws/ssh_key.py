"""The workers' SSH key, made on the manager (``manage_ssh_key``).

At start the manager loads its Ed25519 key from ``state_dir`` or makes one there (mode
0600, in a 0700 folder, OpenSSH format, which paramiko loads), and makes sure EC2's key
pair ``key_name`` holds its public half: imported when missing, replaced when it holds
another key (the Auto Scaling group replaced the manager, and the new one made a new
key). The private key never leaves the manager's machine; EC2 puts the public half into
the authorized keys of every worker launched afterwards, and the SSH bootstrap checks
the workers' host keys as before (:mod:`fleet.aws.ssh_bootstrap`).

Two managers overlapping during a replacement each import their own key; a worker
launched by the one whose key was replaced fails its bootstrap (authentication refused)
and is replaced like any failed bootstrap, so the fleet converges on the new key.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.aws.config import (
    FLEET_TAG_KEY,
    AwsFleetConfig,
    ensure_private_dir,
    write_private_file,
)

log = logging.getLogger(__name__)

KEY_FILE_SUFFIX = "_ed25519"


class SshKeyError(ValueError):
    """The key in the state folder cannot be used (wrong mode, type or format)."""


@dataclass(frozen=True)
class FleetKey:
    private_key_path: Path
    public_line: str  # "ssh-ed25519 AAAA... comment"
    action: str  # what happened to EC2's key pair: "kept", "imported" or "replaced"


def key_path(config: AwsFleetConfig) -> Path:
    if not config.state_dir:
        raise SshKeyError("manage_ssh_key needs state_dir: where the manager keeps its key")
    return Path(config.state_dir) / f"{config.key_name}{KEY_FILE_SUFFIX}"


def load_or_create_key(path: Path, comment: str) -> tuple[str, bool]:
    """The public line of the Ed25519 key at ``path``, made there first if missing;
    and whether it was made now."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ensure_private_dir(path.parent)
    created = False
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SshKeyError(f"SSH key {path} is readable by others (mode {mode:04o}); "
                              "chmod 600 it or remove it to have a new one made")
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise SshKeyError(f"SSH key {path} is not an unencrypted OpenSSH private key "
                              f"({exc}); remove it to have a new one made") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SshKeyError(f"SSH key {path} is not an Ed25519 key; remove it to have a "
                              "new one made")
    else:
        key = Ed25519PrivateKey.generate()
        write_private_file(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()).decode())
        created = True
        log.info("made a new SSH key for the workers: %s", path)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return f"{public} {comment}", created


def same_key(a: str | None, b: str | None) -> bool:
    """Two ``TYPE BASE64 [COMMENT]`` lines name the same key (comments aside)."""
    return bool(a and b) and a.split()[:2] == b.split()[:2]


def key_pair_action(existing_public: str | None, exists: bool, ours: str) -> str:
    """Pure decision: what to do with EC2's key pair of our name."""
    if not exists:
        return "imported"
    return "kept" if same_key(existing_public, ours) else "replaced"


def ensure_fleet_key(ec2: Any, config: AwsFleetConfig) -> FleetKey:
    """Make or load the key, then make EC2's key pair ``key_name`` hold its public half.
    AWS errors are raised as the provider's transient or permanent errors."""
    from botocore.exceptions import BotoCoreError, ClientError

    from fleet.aws.provider import classify, error_code

    path = key_path(config)
    public, _ = load_or_create_key(path, f"imagefleet-{config.name}-manager")
    try:
        try:
            pairs = ec2.describe_key_pairs(KeyNames=[config.key_name],
                                           IncludePublicKey=True)["KeyPairs"]
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.NotFound":
                raise
            pairs = []
        existing = pairs[0].get("PublicKey") if pairs else None
        action = key_pair_action(existing, bool(pairs), public)
        if action == "replaced":
            ec2.delete_key_pair(KeyName=config.key_name)
        if action != "kept":
            ec2.import_key_pair(
                KeyName=config.key_name, PublicKeyMaterial=public.encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
                    {"Key": FLEET_TAG_KEY, "Value": config.name}]}])
    except (BotoCoreError, ClientError) as exc:
        raise classify(exc, f"key pair {config.key_name}") from exc
    log.info("EC2 key pair %s: %s (the manager's own key)", config.key_name, action)
    return FleetKey(path, public, action)
