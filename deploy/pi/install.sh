#!/usr/bin/env bash
# Install the facegate door agent on Raspberry Pi OS Bookworm (64-bit).
#   sudo deploy/pi/install.sh [--kiosk] [path-to-facegate-checkout-or-wheel]
# --kiosk also installs Chromium and starts it full-screen on the door screen ([kiosk] in device.toml)
# whenever the desktop session starts (Raspberry Pi OS with desktop, auto-login to the display user).
# picamera2 and gpiozero come from apt (they need libcamera's system bindings), so the venv
# is created with --system-site-packages; everything else comes from PyPI via the `device` extra.
set -euo pipefail
kiosk=0
if [ "${1:-}" = "--kiosk" ]; then kiosk=1; shift; fi
src=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
prefix=/opt/facegate
if [ "$(id -u)" -ne 0 ]; then echo "run as root (sudo)" >&2; exit 1; fi

apt-get update
apt-get install -y python3-venv python3-picamera2 python3-gpiozero python3-numpy libopenblas0

id facegate >/dev/null 2>&1 || useradd --system --home /var/lib/facegate --shell /usr/sbin/nologin facegate
# The relay and the camera: gpio and video groups.
usermod -aG gpio,video facegate

python3 -m venv --system-site-packages "$prefix/venv"
# Pinned versions only (deploy/pi/constraints.txt): an install never pulls an untested release.
constraints="$(cd "$(dirname "$0")" && pwd)/constraints.txt"
"$prefix/venv/bin/pip" install --require-virtualenv -c "$constraints" "pip"
"$prefix/venv/bin/pip" install --require-virtualenv -c "$constraints" "${src}[device]"

install -d -o facegate -g facegate -m 0750 /var/lib/facegate
install -d -m 0755 /etc/facegate
if [ ! -f /etc/facegate/device.toml ]; then
  install -m 0640 -g facegate "$src/deploy/device.example.toml" /etc/facegate/device.toml
  echo "edit /etc/facegate/device.toml (device id, camera type = \"picamera2\", door type = \"gpio\")"
fi
install -m 0644 "$src/deploy/systemd/facegate-device.service" /etc/systemd/system/facegate-device.service
systemctl daemon-reload
systemctl enable facegate-device.service
if [ "$kiosk" -eq 1 ]; then
  # The door screen: Chromium in kiosk mode, autostarted by the desktop session (X11 or Wayland).
  apt-get install -y chromium-browser curl || apt-get install -y chromium curl
  install -d -m 0755 "$prefix/bin"
  install -m 0755 "$src/deploy/pi/facegate-kiosk-browser" "$prefix/bin/facegate-kiosk-browser"
  install -m 0644 "$src/deploy/pi/facegate-kiosk.desktop" /etc/xdg/autostart/facegate-kiosk.desktop
  # No screen blanking on the door's display (raspi-config: 1 = disable blanking).
  if command -v raspi-config >/dev/null; then raspi-config nonint do_blanking 1 || true; fi
  echo "set [kiosk] enabled = true in /etc/facegate/device.toml; the screen shows at the next desktop login"
fi
"$prefix/venv/bin/facegate" device run --validate-config --config /etc/facegate/device.toml
echo "start with: systemctl start facegate-device; check with: facegate doctor --config /etc/facegate/device.toml"
