#!/usr/bin/env bash
# check-rendezvous.sh - check the common --rendezvous flag of every test
# program, dynamic and static build (run `make` first; caps needs root and is
# skipped otherwise).
#
# For each binary and each rendezvous step N in its list (3 and its last
# step, for signals also 50 and 51), it checks that the program:
#   * waits in rt_sigtimedwait (/proc/PID/syscall starts with "128 "), in
#     state S, and uses no CPU time while it waits;
#   * has written only a prefix of the reference stdout so far;
#   * after SIGSTOP/SIGCONT (the wait ends with EINTR) waits again, and
#     shows SIGUSR2 in SigBlk while stopped;
#   * after `kill -USR2` exits 0 with stdout byte-identical to a run
#     without --rendezvous.
# A rendezvous one step beyond the last must never wait: the run completes
# with the reference stdout. Last come the negative cases under a
# rendezvous: seccomp --violate-at 3 still dies by SIGSYS, and caps
# --try-regain-at 3 is still refused.
#
# Exits 0 when every check passed, 1 otherwise.
set -u

here=$(cd "$(dirname "$0")" && pwd)
build=$here/build
work=$(mktemp -d)

failures=0
waiting_pid=

fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

# Leave nothing behind: release (then kill) the victim we started.
release_leftover() {
    if [ -n "$waiting_pid" ] && kill -0 "$waiting_pid" 2>/dev/null; then
        kill -USR2 "$waiting_pid" 2>/dev/null
        sleep 0.2
        kill -KILL "$waiting_pid" 2>/dev/null
        wait "$waiting_pid" 2>/dev/null
    fi
    waiting_pid=
}

# Polls up to 10 s until PID waits in rt_sigtimedwait (syscall 128).
await_rendezvous() {
    local pid=$1 i
    for i in $(seq 200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        case $(cat "/proc/$pid/syscall" 2>/dev/null) in
            "128 "*) return 0 ;;
        esac
        sleep 0.05
    done
    return 1
}

state_of() {
    sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status"
}

# utime + stime in clock ticks (fields 14 and 15; comm may hold spaces).
cpu_ticks_of() {
    local stat
    stat=$(cat "/proc/$1/stat")
    set -- ${stat##*) }
    echo $(( ${12} + ${13} ))
}

# run_waiting NAME BINARY N REFERENCE ARGS...: one run that must wait at N.
run_waiting() {
    local label=$1 binary=$2 step=$3 reference=$4
    shift 4
    local out=$work/out rc pid
    "$binary" "$@" --rendezvous "$step" </dev/null >"$out" 2>"$work/err" &
    pid=$!
    waiting_pid=$pid
    if ! await_rendezvous "$pid"; then
        fail "$label: not waiting in rt_sigtimedwait at step $step"
        release_leftover
        return
    fi
    local ticks_before ticks_after state
    ticks_before=$(cpu_ticks_of "$pid")
    sleep 0.3
    ticks_after=$(cpu_ticks_of "$pid")
    state=$(state_of "$pid")
    [ "$state" = S ] || fail "$label: state $state while waiting, expected S"
    [ "$ticks_after" = "$ticks_before" ] ||
        fail "$label: used CPU while waiting ($ticks_before -> $ticks_after ticks)"
    local size
    size=$(stat -c %s "$out")
    cmp -s -n "$size" "$out" "$reference" ||
        fail "$label: stdout so far is not a prefix of the reference"

    # A stop ends the wait with EINTR; the program must wait again.
    kill -STOP "$pid"
    for _ in $(seq 100); do
        [ "$(state_of "$pid")" = T ] && break
        sleep 0.01
    done
    local blocked
    blocked=$(sed -n 's/^SigBlk:[[:space:]]*//p' "/proc/$pid/status")
    (( 0x$blocked & 0x800 )) ||
        fail "$label: SIGUSR2 not blocked while stopped (SigBlk $blocked)"
    kill -CONT "$pid"
    sleep 0.1
    case $(cat "/proc/$pid/syscall" 2>/dev/null) in
        "128 "*) ;;
        *) fail "$label: not waiting again after SIGSTOP/SIGCONT" ;;
    esac

    kill -USR2 "$pid"
    wait "$pid"
    rc=$?
    waiting_pid=
    [ "$rc" = 0 ] || fail "$label: exit status $rc after release"
    cmp -s "$out" "$reference" ||
        fail "$label: stdout differs from the run without --rendezvous"
    [ -s "$work/err" ] && fail "$label: wrote to stderr: $(head -c 200 "$work/err")"
    echo "ok $label: waited at step $step, same stdout after release"
}

# check_program NAME STEPS LAST ARGS...: STEPS lists the rendezvous steps to
# wait at; LAST is the number of steps ARGS give.
check_program() {
    local name=$1 steps=$2 last=$3
    shift 3
    local binary
    for binary in "$build/$name" "$build/$name-static"; do
        local short=${binary#"$here/"}
        if [ ! -x "$binary" ]; then
            fail "$short: missing (run make first)"
            continue
        fi
        local reference=$work/reference rc
        "$binary" "$@" </dev/null >"$reference" 2>/dev/null
        rc=$?
        if [ "$rc" != 0 ]; then
            fail "$short $*: reference run exit status $rc"
            continue
        fi
        local step
        for step in $steps; do
            run_waiting "$short $* --rendezvous $step" "$binary" "$step" \
                "$reference" "$@"
        done
        local beyond=$((last + 1)) out=$work/out
        timeout 60 "$binary" "$@" --rendezvous "$beyond" \
            </dev/null >"$out" 2>/dev/null
        rc=$?
        if [ "$rc" != 0 ]; then
            fail "$short $* --rendezvous $beyond: exit status $rc (124 = hung)"
        elif ! cmp -s "$out" "$reference"; then
            fail "$short $* --rendezvous $beyond: stdout differs"
        else
            echo "ok $short $* --rendezvous $beyond: never waited, same stdout"
        fi
    done
}

# The negative cases, with the rendezvous right before the round that acts.
check_negative() {
    local binary=$1 expected_rc=$2 expected_text=$3
    shift 3
    local short=${binary#"$here/"} out=$work/out rc pid
    "$binary" "$@" --rendezvous 3 </dev/null >"$out" 2>/dev/null &
    pid=$!
    waiting_pid=$pid
    if ! await_rendezvous "$pid"; then
        fail "$short $* --rendezvous 3: not waiting"
        release_leftover
        return
    fi
    kill -USR2 "$pid"
    # The braces keep the shell's "Bad system call" job notice off stderr.
    { wait "$pid"; } 2>/dev/null
    rc=$?
    waiting_pid=
    if [ "$rc" != "$expected_rc" ]; then
        fail "$short $* --rendezvous 3: exit status $rc, expected $expected_rc"
    elif ! grep -q "$expected_text" "$out"; then
        fail "$short $* --rendezvous 3: no '$expected_text' on stdout"
    else
        echo "ok $short $* --rendezvous 3: status $rc, '$expected_text'"
    fi
}

trap 'release_leftover; rm -rf "$work"' EXIT

check_program memwalk "3 5000" 5000 --mib 4 --steps 5000 --batch 500 --pause-us 1000
check_program sleeper "3 10" 10 --rounds 10 --sleep-ms 10
# signals: also right before and after round 50, its SIGUSR2 round.
check_program signals "3 50 51 60" 60 --rounds 60 --pause-us 1000
check_program seccomp "3 10" 10 --rounds 10 --pause-us 1000
check_negative "$build/seccomp" 159 "calling forbidden getppid" \
    --rounds 10 --pause-us 1000 --violate-at 3
check_negative "$build/seccomp-static" 159 "calling forbidden getppid" \
    --rounds 10 --pause-us 1000 --violate-at 3
if [ "$(id -u)" = 0 ]; then
    check_program caps "3 10" 10 --rounds 10 --pause-us 1000
    check_negative "$build/caps" 0 "regain refused" \
        --rounds 10 --pause-us 1000 --try-regain-at 3
    check_negative "$build/caps-static" 0 "regain refused" \
        --rounds 10 --pause-us 1000 --try-regain-at 3
else
    echo "skip caps (needs root)"
fi

check_program heapchurn "3 10" 10 --rounds 10 --ops 100 --pause-us 1000
# deepstack waits at the deepest point of the round.
check_program deepstack "3 5" 5 --depth-kib 1024 --rounds 5 --pause-us 1000
check_program holes "3 20" 20 --steps 20 --pause-us 1000
check_program sparse "3 2000" 2000 --reserve-gib 4 --pages 200 --steps 2000 \
    --batch 100 --pause-us 1000
check_program filemaps "3 10" 10 --rounds 10 --pause-us 1000 --shared 1
check_program vectors "3 10" 10 --rounds 10 --iters 10000
check_program blocked "3 5" 5 --rounds 5 --wait-ms 2 \
    --in nanosleep,futex,poll,epoll
check_program kvstore "3 10" 10 --records 1000 --ops 20000 --batch 2000 \
    --pause-us 1000 --report-ms 0
check_program context "3 10" 10 --rounds 10 --pause-us 1000 --thp 3 --autodisarm 1 --thread 1
check_program forker "3 10" 10 --rounds 10 --pause-us 1000
check_program descriptors "3 10" 10 --rounds 10 --pause-us 1000
check_program sharedmem "3 10" 10 --rounds 10 --pause-us 1000
check_program kernobjects "3 10" 10 --rounds 10 --pause-us 1000 --timer-ms 0
check_program affinity "3 10" 10 --rounds 10 --sleep-ms 2 --cpus 1

if [ "$failures" != 0 ]; then
    echo "$failures check(s) FAILED"
    exit 1
fi
echo "all rendezvous checks passed"
