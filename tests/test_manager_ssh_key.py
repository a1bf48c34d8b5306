"""The workers' SSH key made on the manager (``manage_ssh_key``): EC2 is moto, and the
key is shown to work against a real OpenSSH server on loopback, with the host key
checked as in every bootstrap. The public half reaches sshd's authorized_keys from EC2's
key pair, as cloud-init puts it on a worker."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path

import boto3
import pytest
from helpers_aws import Sshd, console_output_with
from helpers_manager import REGION
from moto import mock_aws

from fleet.aws import ssh_bootstrap as bootstrap
from fleet.aws.config import AwsFleetConfig, config_from_dict
from fleet.aws.ssh_key import SshKeyError, ensure_fleet_key, key_pair_action
from fleet.providers.base import PermanentProviderError


def _config(state: Path) -> AwsFleetConfig:
    from test_manager_host import MINIMAL

    return config_from_dict({**MINIMAL, "region": REGION, "manage_ssh_key": True,
                             "state_dir": str(state)})


@pytest.fixture
def ec2(fake_aws: None):
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _public(ec2, name: str) -> str:
    return ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"][0][
        "PublicKey"]


def test_key_pair_decision() -> None:
    ours = "ssh-ed25519 AAAAC3Nza-ours imagefleet-x-manager"
    assert key_pair_action(None, False, ours) == "imported"
    assert key_pair_action("ssh-ed25519 AAAAC3Nza-ours imgf-x", True, ours) == "kept"
    assert key_pair_action("ssh-ed25519 AAAAC3Nza-theirs", True, ours) == "replaced"
    assert key_pair_action(None, True, ours) == "replaced"  # EC2 gave no key material


def test_a_manager_inside_the_vpc_bootstraps_over_the_private_address() -> None:
    """The workers' SSH rule names the manager's security group, which only admits
    traffic inside the VPC; a manager outside (a laptop) needs the public address."""
    from fleet.aws.provider import ssh_address

    both = {"PrivateIpAddress": "10.0.1.5", "PublicIpAddress": "203.0.113.9"}
    assert ssh_address(both, inside_vpc=True) == "10.0.1.5"
    assert ssh_address(both, inside_vpc=False) == "203.0.113.9"
    assert ssh_address({"PrivateIpAddress": "10.0.1.5"}, inside_vpc=False) == "10.0.1.5"
    assert ssh_address({}, inside_vpc=True) is None


def test_manager_makes_imports_then_reuses_its_key(ec2, tmp_path: Path) -> None:
    config = _config(tmp_path / "state")
    first = ensure_fleet_key(ec2, config)
    assert first.action == "imported"
    assert stat.S_IMODE(first.private_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.private_key_path.parent.stat().st_mode) == 0o700
    assert _public(ec2, config.key_name).split()[:2] == first.public_line.split()[:2]
    tags = ec2.describe_key_pairs(KeyNames=[config.key_name])["KeyPairs"][0]["Tags"]
    assert {"Key": "imagefleet:fleet", "Value": config.name} in tags
    # A restart of the same manager: the same key, EC2 left alone.
    again = ensure_fleet_key(ec2, config)
    assert again.action == "kept" and again.public_line == first.public_line


def test_a_replacement_manager_replaces_the_key_pair(ec2, tmp_path: Path) -> None:
    """The ASG replaced the manager: a new machine, a new state folder, a new key."""
    old = ensure_fleet_key(ec2, _config(tmp_path / "old"))
    new = ensure_fleet_key(ec2, _config(tmp_path / "new"))
    assert new.action == "replaced" and new.public_line != old.public_line
    assert _public(ec2, "imgf-mgr").split()[:2] == new.public_line.split()[:2]
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1


def test_a_key_others_can_read_or_that_is_not_ed25519_is_refused(ec2, tmp_path: Path) -> None:
    config = _config(tmp_path / "state")
    made = ensure_fleet_key(ec2, config)
    os.chmod(made.private_key_path, 0o644)
    with pytest.raises(SshKeyError, match=r"readable by others.*chmod 600"):
        ensure_fleet_key(ec2, config)
    made.private_key_path.write_text("not a key")
    os.chmod(made.private_key_path, 0o600)
    with pytest.raises(SshKeyError, match="not an unencrypted OpenSSH private key"):
        ensure_fleet_key(ec2, config)


def test_permission_errors_are_permanent_provider_errors(ec2, tmp_path: Path) -> None:
    """moto grants everything: AccessDenied is injected at the client (the boundary)."""
    from botocore.exceptions import ClientError

    def denied(**_: object) -> None:
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}},
                          "ImportKeyPair")

    ec2.import_key_pair = denied
    with pytest.raises(PermanentProviderError, match="missing permission"):
        ensure_fleet_key(ec2, _config(tmp_path / "state"))


@pytest.mark.sshd
def test_workers_accept_the_managers_key_with_host_keys_checked(ec2, tmp_path: Path) -> None:
    config = _config(tmp_path / "state")
    key = ensure_fleet_key(ec2, config)
    sshd = Sshd.prepare(tmp_path / "sshd")
    # What cloud-init does on a worker: EC2's public key into authorized_keys.
    (sshd.root / "authorized_keys").write_text(_public(ec2, config.key_name) + "\n")
    sshd.launch()
    try:
        keys = bootstrap.parse_console_host_keys(console_output_with([sshd.host_key_line]))
        target = bootstrap.SshTarget(host="127.0.0.1", port=sshd.port, username=sshd.user,
                                     key_file=key.private_key_path, host_keys=keys)
        client = bootstrap.connect(target, deadline=time.monotonic() + 30)
        try:
            result = bootstrap.check_command(client, "echo worker-ok",
                                             deadline=time.monotonic() + 30)
        finally:
            client.close()
        assert result.stdout.strip() == "worker-ok"
        # Another host key than the published one is refused, whatever the client key.
        other = Sshd.prepare(tmp_path / "other")
        wrong = dataclasses.replace(target, host_keys=bootstrap.parse_console_host_keys(
            console_output_with([other.host_key_line])))
        with pytest.raises(bootstrap.HostKeyMismatch):
            bootstrap.connect(wrong, deadline=time.monotonic() + 30)
    finally:
        sshd.stop()
