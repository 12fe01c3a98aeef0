# The stand-in installer's kickstart parser (busybox awk). The rules file (made by tests/ks_standin.py
# from pykickstart's RHEL9 handler) lists commands with their options, removed commands and sections.
# Errors are pykickstart's messages, on stderr; exit 1. %post bodies go to files in OUT (default
# /run/install). On success it prints facts for the installer:
#   missing <items>, hostname <name>, sshkey <user> <key>, post <line>:<log|->:<0|1>:<body file>,
#   end <poweroff|shutdown|reboot|halt>, source-cdrom 1
function fail(n, msg) {
    printf "The following problem occurred on line %d of the kickstart file:\n\n%s\n", n, msg > "/dev/stderr"
    failed = 1
    exit 1
}
function option_value(name,    i) {
    for (i = 2; i <= nw; i++) if (index(w[i], name "=") == 1) return substr(w[i], length(name) + 2)
    return ""
}
BEGIN {
    while ((getline rule < RULES) > 0) {
        n = split(rule, f, " ")
        if (f[1] == "command") { known[f[2]] = 1; for (i = 3; i <= n; i++) opt[f[2] " " f[i]] = 1 }
        else if (f[1] == "removed") removed[f[2]] = 1
        else if (f[1] == "section") { section[f[2]] = 1; for (i = 3; i <= n; i++) sopt[f[2] " " f[i]] = 1 }
    }
    insec = ""; posts = 0
}
{
    line = $0
    sub(/^[ \t]+/, "", line)
    if (insec != "") {
        if (line ~ /^%/) {
            split(line, h, /[ \t]+/)
            if (h[1] == "%end") { if (insec == "%post") close(postfile); insec = ""; next }
            if (h[1] in section) fail(NR, "Section " insec " does not end with %end.")
        }
        if (insec == "%post") print $0 > postfile
        next
    }
    if (line == "" || line ~ /^#/) next
    nw = split(line, w, /[ \t]+/)
    if (w[1] ~ /^%/) {
        if (!(w[1] in section)) fail(NR, "Unknown kickstart section: " w[1])
        for (i = 2; i <= nw; i++) if (w[i] ~ /^--/) {
            o = w[i]; sub(/=.*/, "", o)
            if (!((w[1] " " o) in sopt)) fail(NR, "unrecognized arguments: " w[i])
        }
        insec = w[1]; secline = NR
        if (insec == "%post") {
            postfile = (OUT == "" ? "/run/install" : OUT) "/post-" posts
            logf = option_value("--log"); if (logf == "") logf = option_value("--logfile")
            err = 0; for (i = 2; i <= nw; i++) if (w[i] == "--erroronfail") err = 1
            post[posts++] = NR ":" (logf == "" ? "-" : logf) ":" err ":" postfile
            printf "" > postfile
        }
        next
    }
    c = w[1]
    if (c in removed) fail(NR, c " has been removed.")
    if (!(c in known)) fail(NR, "Unknown command: " c)
    for (i = 2; i <= nw; i++) if (w[i] ~ /^--/) {
        o = w[i]; sub(/=.*/, "", o)
        if (!((c " " o) in opt)) fail(NR, "unrecognized arguments: " w[i])
    }
    seen[c] = 1
    if (c == "network" && option_value("--hostname") != "") hostname = option_value("--hostname")
    if (c == "user" && index(option_value("--groups"), "wheel")) admin = 1
    if (c == "sshkey") {
        key = line; sub(/^[^"]*"/, "", key); sub(/".*$/, "", key)
        keys = keys "sshkey " option_value("--username") " " key "\n"
    }
    if (c == "poweroff" || c == "shutdown" || c == "reboot" || c == "halt") end = c
}
END {
    if (failed) exit 1
    if (insec != "") fail(NR, "Section " insec " does not end with %end.")
    # What a kickstart install cannot go on without (Anaconda's text hub waits for these): an
    # installation source, storage, and a root password or an administrator (wheel) account.
    miss = ""
    if (!("cdrom" in seen || "url" in seen || "nfs" in seen || "harddrive" in seen || "liveimg" in seen || "ostreesetup" in seen)) miss = miss " source"
    if (!("autopart" in seen || "part" in seen || "partition" in seen || "logvol" in seen || "mount" in seen)) miss = miss " storage"
    if (!("rootpw" in seen || admin)) miss = miss " root-password"
    print "missing" miss
    if (hostname != "") print "hostname " hostname
    printf "%s", keys
    for (i = 0; i < posts; i++) print "post " post[i]
    if (end != "") print "end " end
    if ("cdrom" in seen) print "source-cdrom 1"
}
