#!/usr/bin/python3
"""One BitTorrent node for the lab, on Debian's python3-libtorrent (run it with /usr/bin/python3,
which has the binding; the lab's own Python need not). Standalone: imports nothing from naiad.

    bt_node.py seed  --blob FILE --torrent OUT --listen IP:PORT [--utp] [--hybrid]
    bt_node.py leech --torrent FILE --save DIR --listen IP:PORT --peers IP:PORT,… [--utp]

Connections are TCP only unless --utp (libtorrent's uTP costs about twice the CPU here, which two
shared cores cannot spare: 8 x 64 MiB took 14-19 s with it, 8-9 s without); the torrent is v1
only unless --hybrid (libtorrent's default, hashing every piece twice: ~10 s, and the figures in
the field notes).

Protocol with the lab, one line at a time: the node prints "ready" once set up; a leecher then
waits for a line on stdin ("go"), connects to every peer it was given (full mesh, no tracker,
no DHT/LSD/UPnP/NAT-PMP) and prints "done" the moment it holds every piece, hash-checked. Both
keep serving until their stdin is closed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import libtorrent as lt


def _session(listen: str, utp: bool) -> lt.session:
    return lt.session({
        "listen_interfaces": listen,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": utp,
        "enable_incoming_utp": utp,
        "alert_mask": 0,
    })


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def seed(blob: str, torrent: str, listen: str, utp: bool, hybrid: bool) -> None:
    fs = lt.file_storage()
    lt.add_files(fs, blob)
    t = lt.create_torrent(fs, 0, 0 if hybrid else lt.create_torrent.v1_only)
    lt.set_piece_hashes(t, os.path.dirname(os.path.abspath(blob)))
    with open(torrent + ".tmp", "wb") as f:
        f.write(lt.bencode(t.generate()))
    os.replace(torrent + ".tmp", torrent)
    ses = _session(listen, utp)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = os.path.dirname(os.path.abspath(blob))
    atp.flags |= lt.torrent_flags.seed_mode
    h = ses.add_torrent(atp)
    while not h.status().is_seeding:
        time.sleep(0.05)
    ti = atp.ti
    print(f"piece size {ti.piece_length()}, {ti.num_pieces()} pieces", file=sys.stderr)
    _say("ready")
    sys.stdin.read()


def leech(torrent: str, save: str, listen: str, peers: list[str], utp: bool) -> None:
    ses = _session(listen, utp)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save
    h = ses.add_torrent(atp)
    while h.status().state in (lt.torrent_status.checking_files,
                               lt.torrent_status.checking_resume_data):
        time.sleep(0.02)
    _say("ready")
    sys.stdin.readline()
    for peer in peers:
        host, _, port = peer.rpartition(":")
        h.connect_peer((host, int(port)))
    while not h.status().is_seeding:
        time.sleep(0.01)
    _say("done")
    st = h.status()
    print(f"done: downloaded {st.total_download} B (payload {st.total_payload_download} B), "
          f"uploaded so far {st.total_upload} B, peers {st.num_peers}", file=sys.stderr)
    sys.stdin.read()
    st = h.status()
    print(f"exit: uploaded {st.total_payload_upload} B payload", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--blob", required=True)
    s.add_argument("--torrent", required=True)
    s.add_argument("--listen", required=True)
    le = sub.add_parser("leech")
    le.add_argument("--torrent", required=True)
    le.add_argument("--save", required=True)
    le.add_argument("--listen", required=True)
    le.add_argument("--peers", default="")
    for p in (s, le):
        p.add_argument("--utp", action="store_true", help="also uTP (default: TCP only)")
    s.add_argument("--hybrid", action="store_true",
                   help="a hybrid v1+v2 torrent, libtorrent's default (default: v1 only)")
    args = ap.parse_args()
    if args.role == "seed":
        seed(args.blob, args.torrent, args.listen, args.utp, args.hybrid)
    else:
        leech(args.torrent, args.save, args.listen, [p for p in args.peers.split(",") if p],
              args.utp)


if __name__ == "__main__":
    main()
