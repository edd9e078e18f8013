#!/bin/busybox sh
# vmsilab guest /init (busybox sh). The host watches the serial console for the
# LAB_* markers; see guest-lab.md section 3.4 and vmsilab/guest.py.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

while read -r mod; do
    [ -n "$mod" ] && modprobe "$mod"
done </etc/modules

lab_ip=10.0.0.2/24
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab_ip=*) lab_ip=${arg#lab_ip=} ;;
        --) break ;;
    esac
done

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 10 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add "$lab_ip" dev eth0
fi

echo "LAB_SHELL_READY uptime=$(cut -d' ' -f1 /proc/uptime)"
ip addr

if [ -f /lab-run.sh ]; then
    echo "LAB_CMD: sh /lab-run.sh"
    sh /lab-run.sh
    echo "LAB_CMD_RC=$?"
elif [ $# -gt 0 ]; then
    echo "LAB_CMD: $*"
    sh -c "$*"
    echo "LAB_CMD_RC=$?"
else
    setsid cttyhack sh
fi

echo LAB_POWEROFF
sync
poweroff -f
