"""Create, report and remove the AWS side of an ImageFleet fleet.

    python -m scripts.bootstrap_aws up     --name NAME [options]
    python -m scripts.bootstrap_aws status --name NAME [--show-token] [--region R]
    python -m scripts.bootstrap_aws down   --name NAME [--region R] [--profile P]

The command line only: arguments in, exit codes out (0 done, 2 refused, 1 AWS failed).
What ``up``, ``status`` and ``down`` do is :mod:`fleet.aws.operator`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fleet.aws.apply import InfraError, make_clients
from fleet.aws.config import ConfigError, validate_fleet_name
from fleet.aws.operator import (
    DEFAULT_INSTANCE_TYPES,
    DEFAULT_SSH_USER,
    DEFAULT_TOKEN_OVERLAP_S,
    UpOptions,
    down,
    forget_local_files,
    format_status,
    status,
    up,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bootstrap_aws",
        description="Create (up), report (status) or remove (down) the AWS side of an "
                    "ImageFleet fleet. Everything is tagged imagefleet:fleet=NAME.")
    parser.add_argument("command", choices=("up", "status", "down"))
    parser.add_argument("--name", required=True, help="fleet name (1-20 of a-z, 0-9, -)")
    parser.add_argument("--region", help="AWS region (default: from the profile/env)")
    parser.add_argument("--profile", help="AWS credentials profile")
    parser.add_argument("--endpoint-url", help="endpoint for every service (moto, LocalStack)")
    # Gone: the manager runs in the VPC and is the only one that SSHes to workers.
    parser.add_argument("--admin-cidr", help=argparse.SUPPRESS)
    parser.add_argument("--allowed-cidr", "--alb-cidr", dest="allowed_cidr",
                        help="who may reach the load balancer (default with a token: "
                             "anyone, 0.0.0.0/0; without one it must be given)")
    parser.add_argument("--certificate-arn",
                        help="ACM certificate for your own domain (default: a self-signed "
                             "one for the load balancer's DNS name, which clients pin)")
    parser.add_argument("--insecure-http", action="store_true",
                        help="serve plain HTTP on port 80 and no HTTPS (not for real use)")
    parser.add_argument("--no-token", dest="token", action="store_false",
                        help="no API token (needs --public and --allowed-cidr)")
    parser.add_argument("--public", action="store_true",
                        help="with --no-token: yes, anyone allowed may use the fleet")
    parser.add_argument("--rotate-token", action="store_true",
                        help="up: write a new API token; the old one stays accepted for "
                             "--token-overlap seconds")
    parser.add_argument("--rotate-admin-token", action="store_true",
                        help="up: write a new admin token (same overlap)")
    parser.add_argument("--token-overlap", type=float, default=DEFAULT_TOKEN_OVERLAP_S,
                        metavar="SECONDS",
                        help=f"how long a rotated-out token is still accepted (default "
                             f"{DEFAULT_TOKEN_OVERLAP_S:.0f})")
    parser.add_argument("--show-token", action="store_true",
                        help="status: print the API token and the admin token")
    parser.add_argument("--instance-type", action="append", dest="instance_types",
                        help="workers' EC2 instance type, repeat for fallbacks in order "
                             f"(default: {' '.join(DEFAULT_INSTANCE_TYPES)})")
    parser.add_argument("--manager-instance-type", default="t3.small",
                        help="the manager's instance type (default: t3.small)")
    parser.add_argument("--ami", help="AMI id (default: latest Debian 12 from SSM)")
    parser.add_argument("--ssh-user", default=DEFAULT_SSH_USER,
                        help=f"login user of the AMI (default: {DEFAULT_SSH_USER})")
    parser.add_argument("--result-days", type=int, default=7,
                        help="days before results expire from the bucket (default: 7)")
    parser.add_argument("--vpc-id", help="VPC (default: the region's default VPC)")
    parser.add_argument("--subnets", help="comma-separated public subnets, >= 2 zones")
    parser.add_argument("--config-out", type=Path,
                        help="fleet config file (default: imagefleet-NAME.json)")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_fleet_name(args.name)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.admin_cidr is not None:
        parser.error("--admin-cidr is no longer used: the manager runs inside the VPC and "
                     "workers accept SSH only from the manager's security group; drop it "
                     "(--allowed-cidr limits who reaches the load balancer)")

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        clients = make_clients(args.region, args.profile, args.endpoint_url)
        if args.command == "up":
            up(clients, UpOptions(
                name=args.name, allowed_cidr=args.allowed_cidr,
                token=args.token, public=args.public, rotate_token=args.rotate_token,
                rotate_admin_token=args.rotate_admin_token,
                token_overlap_s=args.token_overlap, certificate_arn=args.certificate_arn,
                insecure_http=args.insecure_http,
                instance_types=tuple(args.instance_types or DEFAULT_INSTANCE_TYPES),
                manager_instance_type=args.manager_instance_type,
                ami=args.ami, result_days=args.result_days,
                config_out=args.config_out or Path(f"imagefleet-{args.name}.json"),
                vpc_id=args.vpc_id,
                subnets=tuple(s for s in (args.subnets or "").split(",") if s),
                ssh_user=args.ssh_user, endpoint_url=args.endpoint_url,
                profile=args.profile,
            ), report)
        elif args.command == "status":
            info = status(clients, args.name, show_token=args.show_token)
            print(json.dumps(info, indent=2) if args.json else format_status(info))
        else:
            down(clients, args.name, report)
            forget_local_files(args.config_out or Path(f"imagefleet-{args.name}.json"),
                                args.name, report)
    except (InfraError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # botocore's errors (credentials, permissions, throttling) carry a useful message.
        if type(exc).__module__.startswith("botocore"):
            print(f"error: AWS refused or failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
