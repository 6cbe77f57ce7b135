#!/usr/bin/env bash
# Installs the Debian packages the test suite starts real servers from, when missing.
# Idempotent; uses sudo when not root. Outside CI a failure here only warns: the tests
# that need a missing server then skip with a reason (in CI they fail).
set -uo pipefail

need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v rsyslogd >/dev/null || need+=(rsyslog)
[ -f /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || need+=(rsyslog-gnutls)
# Orthanc: the reference DICOM server (PACS export target, benchmark comparison).
command -v Orthanc >/dev/null || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
# DCMTK: storescu as the modality that sends to phivault's C-STORE SCP.
command -v storescu >/dev/null || need+=(dcmtk)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
echo "installing test servers: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; then
    exit 0
fi
if [ "${CI:-}" = "true" ]; then
    echo "error: could not install ${need[*]}" >&2
    exit 1
fi
echo "warning: could not install ${need[*]}; tests needing them will skip" >&2
