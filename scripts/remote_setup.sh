#!/usr/bin/env bash
# Set up (or update) an ImageFleet processing server on this machine. Idempotent: run it
# again with a new bundle to update the code; unchanged requirements are not reinstalled.
#
# Production (root, systemd; what the SSH bootstrap and the user-data script run):
#   remote_setup.sh --source DIR --storage s3://BUCKET/results --region eu-west-1 \
#       [--port 8080] [--host 0.0.0.0] [--prefix /opt/imagefleet] [--user imagefleet] \
#       [--instance-id ID] [--health-timeout 180] [--token-ssm-parameter NAME]
#   creates a system user, a venv under PREFIX, an environment file and a systemd unit
#   (non-root, Restart=always), starts it and waits for http://127.0.0.1:PORT/health.
#
# Tests (no root, no systemd):
#   remote_setup.sh --no-systemd --prefix DIR --source DIR [--venv EXISTING_VENV] \
#       [--python PYTHON] [--port PORT] [--storage LOCATION]
#   copies the code to PREFIX/app, uses EXISTING_VENV as is (no pip, no network) or
#   creates PREFIX/venv, starts `python -m server` in the background (PREFIX/server.pid,
#   PREFIX/server.log) and waits for /health.
#
# --token-ssm-parameter NAME: the server requires the API token held in that SSM
# SecureString and reads it itself at start and every minute (instance role
# credentials); only the name passes through here, never the value.
#
# SOURCE holds server/, requirements.txt and scripts/ (the bundle built by
# fleet/aws/ssh_bootstrap.py). Exit codes: 0 healthy; 1 failed (the reason is on stderr); 2 usage.
set -euo pipefail

source_dir=""
storage=""
region=""
port=8080
host=127.0.0.1
prefix=/opt/imagefleet
service_user=imagefleet
instance_id=""
python_bin=python3
venv=""
use_systemd=1
health_timeout=180
token_parameter=""

die() { echo "remote_setup: $*" >&2; exit 1; }
usage() { echo "remote_setup: $*" >&2; echo "see the header of $0 for usage" >&2; exit 2; }
log() { echo "remote_setup: $*"; }

while (($#)); do
    case "$1" in
        --source) source_dir=${2:?}; shift 2 ;;
        --storage) storage=${2:?}; shift 2 ;;
        --region) region=${2:?}; shift 2 ;;
        --port) port=${2:?}; shift 2 ;;
        --host) host=${2:?}; shift 2 ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --user) service_user=${2:?}; shift 2 ;;
        --instance-id) instance_id=${2:?}; shift 2 ;;
        --python) python_bin=${2:?}; shift 2 ;;
        --venv) venv=${2:?}; shift 2 ;;
        --no-systemd) use_systemd=0; shift ;;
        --health-timeout) health_timeout=${2:?}; shift 2 ;;
        --token-ssm-parameter) token_parameter=${2:?}; shift 2 ;;
        *) usage "unknown argument '$1'" ;;
    esac
done

[[ -n "$source_dir" ]] || usage "--source DIR is required"
[[ -d "$source_dir/server" && -f "$source_dir/server/__main__.py" ]] \
    || die "$source_dir does not contain server/__main__.py"
[[ "$port" =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) \
    || usage "--port must be 1..65535 (got '$port')"
[[ "$health_timeout" =~ ^[0-9]+$ ]] || usage "--health-timeout must be whole seconds"
[[ -z "$token_parameter" || "$token_parameter" =~ ^/[A-Za-z0-9_./-]+$ ]] \
    || usage "--token-ssm-parameter must be a parameter path like /imagefleet/NAME/api-token"
source_dir=$(cd "$source_dir" && pwd)

if ((use_systemd)); then
    ((EUID == 0)) || die "systemd mode must run as root (use sudo), or pass --no-systemd"
    [[ "$storage" == s3://* ]] || usage "--storage s3://BUCKET/PREFIX is required in systemd mode"
    [[ -n "$region" ]] || usage "--region is required in systemd mode"
else
    mkdir -p "$prefix"
    prefix=$(cd "$prefix" && pwd)
    [[ -n "$storage" ]] || storage="$prefix/storage"
fi

install_code() {
    # Copy then rename, so a running server never sees a half-written tree.
    local app="$prefix/app"
    rm -rf "$app.new"
    mkdir -p "$app.new"
    cp -R "$source_dir/server" "$app.new/server"
    cp "$source_dir/requirements.txt" "$app.new/requirements.txt"
    rm -rf "$app.old"
    if [[ -d "$app" ]]; then mv "$app" "$app.old"; fi
    mv "$app.new" "$app"
    rm -rf "$app.old"
    log "code installed in $app"
}

ensure_venv() {
    if [[ -n "$venv" ]]; then
        [[ -x "$venv/bin/python" ]] || die "--venv $venv has no bin/python"
        log "using existing venv $venv (no install)"
        return
    fi
    venv="$prefix/venv"
    if ! "$python_bin" -c 'import ensurepip, venv' 2>/dev/null; then
        if ((use_systemd)) && command -v apt-get >/dev/null; then
            log "installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        else
            die "$python_bin cannot create virtual environments (install python3-venv)"
        fi
    fi
    [[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
    local stamp="$venv/.requirements.sha256" wanted
    wanted=$(sha256sum "$prefix/app/requirements.txt" | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        log "requirements unchanged; skipping pip"
        return
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$prefix/app/requirements.txt"
    echo "$wanted" > "$stamp"
    log "requirements installed in $venv"
}

wait_for_health() {
    # Poll with backoff until the deadline; the server needs a moment to import OpenCV.
    local url="http://127.0.0.1:$port/health" deadline=$((SECONDS + health_timeout)) delay=0.1
    while ((SECONDS < deadline)); do
        if "$venv/bin/python" - "$url" <<'EOF' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
            log "healthy: $url"
            return 0
        fi
        if [[ -n "${server_pid:-}" ]] && ! kill -0 "$server_pid" 2>/dev/null; then
            tail -n 30 "$prefix/server.log" >&2 || true
            die "server exited before becoming healthy"
        fi
        sleep "$delay"
        delay=$(awk -v d="$delay" 'BEGIN { d *= 2; if (d > 2) d = 2; print d }')
    done
    if ((use_systemd)); then
        journalctl -u imagefleet.service -n 30 --no-pager >&2 || true
    else
        tail -n 30 "$prefix/server.log" >&2 || true
    fi
    die "no healthy answer from $url within ${health_timeout}s"
}

imds_instance_id() {
    local token
    token=$(curl -fsS -m 2 -X PUT http://169.254.169.254/latest/api/token \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null) || return 0
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" \
        http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null || true
}

setup_systemd() {
    if ! id -u "$service_user" >/dev/null 2>&1; then
        useradd --system --home-dir "$prefix" --no-create-home \
            --shell /usr/sbin/nologin "$service_user"
        log "created system user $service_user"
    fi
    mkdir -p "$prefix" /etc/imagefleet
    install_code
    ensure_venv
    [[ -n "$instance_id" ]] || instance_id=$(imds_instance_id)
    local env_file=/etc/imagefleet/server.env unit=/etc/systemd/system/imagefleet.service
    local new_env new_unit changed=0
    new_env=$(cat <<EOF
IMAGEFLEET_STORAGE=$storage
IMAGEFLEET_HOST=$host
IMAGEFLEET_PORT=$port
IMAGEFLEET_INSTANCE_ID=${instance_id:-$(hostname)}
IMAGEFLEET_WORKERS=$(nproc)
AWS_REGION=$region
AWS_DEFAULT_REGION=$region
${token_parameter:+IMAGEFLEET_TOKEN_SSM_PARAMETER=$token_parameter}
EOF
)
    new_unit=$(cat <<EOF
[Unit]
Description=ImageFleet processing server
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$service_user
Group=$service_user
WorkingDirectory=$prefix/app
EnvironmentFile=$env_file
ExecStart=$venv/bin/python -m server
Restart=always
RestartSec=1
KillSignal=SIGTERM
# SIGTERM to the supervisor only, which passes it on once: a worker signalled twice
# quits without draining. Whatever is left after the timeout gets SIGKILL.
KillMode=mixed
TimeoutStopSec=60
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
EOF
)
    if [[ ! -f "$env_file" || "$(cat "$env_file")" != "$new_env" ]]; then
        (umask 077; printf '%s\n' "$new_env" > "$env_file.new")
        chown root:"$service_user" "$env_file.new"
        chmod 0640 "$env_file.new"
        mv "$env_file.new" "$env_file"
        changed=1
    fi
    if [[ ! -f "$unit" || "$(cat "$unit")" != "$new_unit" ]]; then
        printf '%s\n' "$new_unit" > "$unit.new"
        mv "$unit.new" "$unit"
        changed=1
    fi
    systemctl daemon-reload
    systemctl enable imagefleet.service >/dev/null
    # New code is always installed, so restart; the unit drains on SIGTERM.
    systemctl restart imagefleet.service
    log "imagefleet.service (re)started (config changed: $changed)"
    wait_for_health
}

stop_background_server() {
    local pid_file="$prefix/server.pid" pid deadline
    [[ -f "$pid_file" ]] || return 0
    pid=$(cat "$pid_file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        deadline=$((SECONDS + 60))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        log "stopped previous server (pid $pid)"
    fi
    rm -f "$pid_file"
}

setup_background() {
    install_code
    ensure_venv
    stop_background_server
    cd "$prefix/app"
    local -a env_args=(IMAGEFLEET_STORAGE="$storage" IMAGEFLEET_HOST="$host"
                       IMAGEFLEET_PORT="$port")
    [[ -n "$instance_id" ]] && env_args+=(IMAGEFLEET_INSTANCE_ID="$instance_id")
    [[ -n "$region" ]] && env_args+=(AWS_REGION="$region" AWS_DEFAULT_REGION="$region")
    [[ -n "$token_parameter" ]] && env_args+=(IMAGEFLEET_TOKEN_SSM_PARAMETER="$token_parameter")
    # setsid + closed stdio: the server outlives this (SSH) session and does not hold
    # its channel open.
    env "${env_args[@]}" setsid "$venv/bin/python" -m server \
        </dev/null >>"$prefix/server.log" 2>&1 &
    server_pid=$!
    echo "$server_pid" > "$prefix/server.pid"
    log "started server pid $server_pid (log $prefix/server.log)"
    wait_for_health
}

if ((use_systemd)); then
    setup_systemd
else
    setup_background
fi
