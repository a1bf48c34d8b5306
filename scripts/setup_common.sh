# What remote_setup.sh (a processing server) and manager_setup.sh (the fleet manager)
# share; sourced by both, never run by itself. Before sourcing, the caller sets
# setup_name (the prefix of its messages); the functions read the caller's prefix,
# venv, python_bin, use_systemd and health_timeout.

die() { echo "$setup_name: $*" >&2; exit 1; }
usage() { echo "$setup_name: $*" >&2; echo "see the header of $0 for usage" >&2; exit 2; }
log() { echo "$setup_name: $*"; }

# find_wheel DIR: the path of the one project wheel in DIR (the bundle), or die.
find_wheel() {
    local -a wheels
    shopt -s nullglob
    wheels=("$1"/imagefleet-*-py3-none-any.whl)
    shopt -u nullglob
    ((${#wheels[@]} == 1)) \
        || die "$1 must hold exactly one imagefleet-*-py3-none-any.whl (found ${#wheels[@]})"
    printf '%s\n' "${wheels[0]}"
}

# install_wheel_tree DIR WHEEL: a fresh DIR holding WHEEL's packages, installed by the
# venv's pip without dependencies (the venv has them) and without an index (offline).
install_wheel_tree() {
    local dir=$1 wheel=$2
    rm -rf "$dir"
    mkdir -p "$dir"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-index --target "$dir" "$wheel" \
        || die "could not install $(basename "$wheel") into $dir"
}

# swap_in_tree DIR: DIR.new (complete) becomes DIR; renames only, so a running service
# never sees a half-written tree.
swap_in_tree() {
    local app=$1
    rm -rf "$app.old"
    if [[ -d "$app" ]]; then mv "$app" "$app.old"; fi
    mv "$app.new" "$app"
    rm -rf "$app.old"
    log "code installed in $app"
}

# ensure_system_user USER: a system user without a login shell, home PREFIX.
ensure_system_user() {
    local user=$1
    if ! id -u "$user" >/dev/null 2>&1; then
        useradd --system --home-dir "$prefix" --no-create-home \
            --shell /usr/sbin/nologin "$user"
        log "created system user $user"
    fi
}

# ensure_venv REQUIREMENTS [apt]: use --venv as is (no pip, no network), or create
# PREFIX/venv and pip-install REQUIREMENTS unless they are unchanged since the last run.
# With "apt" (and systemd mode), a Python without venv support gets python3-venv first.
ensure_venv() {
    local requirements=$1 apt=${2:-}
    if [[ -n "$venv" ]]; then
        [[ -x "$venv/bin/python" ]] || die "--venv $venv has no bin/python"
        log "using existing venv $venv (no install)"
        return
    fi
    venv="$prefix/venv"
    if ! "$python_bin" -c 'import ensurepip, venv' 2>/dev/null; then
        if [[ "$apt" == apt ]] && ((use_systemd)) && command -v apt-get >/dev/null; then
            log "installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        else
            die "$python_bin cannot create virtual environments (install python3-venv)"
        fi
    fi
    [[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
    local stamp="$venv/.requirements.sha256" wanted
    wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        log "requirements unchanged; skipping pip"
        return
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$wanted" > "$stamp"
    log "requirements installed in $venv"
}

# wait_until_answers URL CA_PEM PID: poll URL (over https, pinned to CA_PEM) with
# backoff until it answers 200 (status 0), the process PID is gone (status 1; PID may be
# empty under systemd) or health_timeout seconds pass (status 2). The caller reports.
wait_until_answers() {
    local url=$1 pem=$2 pid=$3 deadline=$((SECONDS + health_timeout)) delay=0.1
    while ((SECONDS < deadline)); do
        if "$venv/bin/python" - "$url" "$pem" <<'PYTHON' 2>/dev/null; then
import ssl, sys, urllib.request
url, pem = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=pem) if url.startswith("https:") else None
with urllib.request.urlopen(url, timeout=2, context=context) as response:
    sys.exit(0 if response.status == 200 else 1)
PYTHON
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep "$delay"
        delay=$(awk -v d="$delay" 'BEGIN { d *= 2; if (d > 2) d = 2; print d }')
    done
    return 2
}

# show_log_tail UNIT LOG_FILE: the last lines of the service's log, on stderr.
show_log_tail() {
    if ((use_systemd)); then
        journalctl -u "$1" -n 30 --no-pager >&2 || true
    else
        tail -n 30 "$2" >&2 || true
    fi
}

# stop_pid_file PID_FILE GRACE_S WHAT: stop a background process started by an earlier
# run (SIGTERM, then SIGKILL after GRACE_S seconds) and remove its pid file.
stop_pid_file() {
    local pid_file=$1 grace=$2 what=$3 pid deadline
    [[ -f "$pid_file" ]] || return 0
    pid=$(cat "$pid_file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        deadline=$((SECONDS + grace))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        log "stopped previous $what (pid $pid)"
    fi
    rm -f "$pid_file"
}
