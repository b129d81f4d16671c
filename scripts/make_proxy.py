#!/usr/bin/env python
"""Write an nginx front for PanTS Label: TLS, HTTP basic auth on every path, admin, reviewer and annotator roles.

The PanTS Label server listens on 127.0.0.1 only; nginx (Debian package ``nginx``) is the one
door to it from the network. This writes, into --out:

    pants_label_site.conf   the server block (include it from the system nginx, conf.d/), or
    nginx.conf              a standalone nginx that includes it (nginx -p OUT -c OUT/nginx.conf)
    users.htpasswd          every account (annotators, reviewers and admins), SHA-512 crypt
    admins.htpasswd         admin accounts only: training, scoring, deletions, uploads, logs
    reviewers.htpasswd      reviewers and admins: senior review of scans whose readings disagree
    front.secret            the secret nginx sends with each request's user and role; start the
                            server with --conf front_secret_file <this file> so that it trusts them
                            (kept when the script runs again, so a running server keeps working)
    tls/cert.pem, key.pem   a self-signed certificate (unless --cert/--key are given)

Accounts are NAME or NAME:PASSWORD; a missing password is generated and printed once. Passwords
can also come from the environment: NAME:env:VARIABLE.

Examples:
    python scripts/make_proxy.py --out /etc/pants_label/proxy --upstream 127.0.0.1:8000 \\
        --listen 443 --server-name label.example.org --admin alice --annotator bob --reviewer carol
    nginx -t -p /etc/pants_label/proxy -c /etc/pants_label/proxy/nginx.conf
    nginx -p /etc/pants_label/proxy -c /etc/pants_label/proxy/nginx.conf
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import re
import secrets
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "configs" / "nginx"
#: glibc's default for $6$: nginx checks the password on every request, so keep it cheap enough
HASH_ROUNDS = 5000


def hash_password(password: str) -> str:
    from passlib.hash import sha512_crypt

    return sha512_crypt.using(rounds=HASH_ROUNDS).hash(password)


def parse_account(spec: str) -> tuple[str, str, bool]:
    """``NAME``, ``NAME:PASSWORD`` or ``NAME:env:VAR`` -> (name, password, generated)."""
    name, _, secret = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):  # it also goes into nginx.conf as a map key
        raise argparse.ArgumentTypeError(f"account name {name!r}: use 1-64 letters, digits or . _ @ -")
    if secret.startswith("env:"):
        var = secret[4:]
        if var not in os.environ:
            raise argparse.ArgumentTypeError(f"account {name}: environment variable {var} is not set")
        return name, os.environ[var], False
    if secret:
        return name, secret, False
    return name, secrets.token_urlsafe(18), True


def render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = sorted(set(re.findall(r"@[a-z_]+@", text)))
    if leftover:
        raise ValueError(f"{template}: placeholders left unfilled: {leftover}")
    return text


def self_signed(tls_dir: Path, names: list[str], days: int) -> tuple[Path, Path]:
    """A self-signed RSA certificate for ``names`` (DNS names or IP addresses) via openssl."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    san = []
    for n in names:
        try:
            ipaddress.ip_address(n)
            san.append(f"IP:{n}")
        except ValueError:
            san.append(f"DNS:{n}")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
         "-subj", f"/CN={names[0]}", "-addext", "subjectAltName=" + ",".join(san),
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


def write_private(path: Path, text: str, group_gid: int | None) -> None:
    """0640 file readable by nginx's worker group (0600 when no group is known)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    if group_gid is not None and os.geteuid() == 0:
        os.chown(tmp, 0, group_gid)
        tmp.chmod(0o640)
    else:
        tmp.chmod(0o600)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_proxy.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the proxy files into")
    p.add_argument("--upstream", default="127.0.0.1:8000", help="the PanTS Label server (default 127.0.0.1:8000)")
    p.add_argument("--listen", default="443", help="nginx listen address: PORT or HOST:PORT (default 443)")
    p.add_argument("--server-name", action="append", default=None,
                   help="host name(s) clients use; the certificate names them (default: this host, localhost)")
    p.add_argument("--admin", action="append", type=parse_account, default=[], help="admin account, repeatable")
    p.add_argument("--annotator", action="append", type=parse_account, default=[],
                   help="annotator account, repeatable")
    p.add_argument("--reviewer", action="append", type=parse_account, default=[],
                   help="reviewer account (senior review of flagged scans), repeatable")
    p.add_argument("--cert", type=Path, help="existing certificate (PEM); default: a new self-signed one")
    p.add_argument("--key", type=Path, help="key of --cert")
    p.add_argument("--days", type=int, default=825, help="validity of the self-signed certificate")
    p.add_argument("--max-body-mb", type=int, default=2048,
                   help="nginx upload limit in MiB; keep it above the server's max_upload_mb (default 2048)")
    p.add_argument("--worker-user", default=None,
                   help="user nginx workers run as when started by root (default www-data, else nobody)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.admin:
        print("make_proxy.py: at least one --admin account is needed", file=sys.stderr)
        return 2
    if bool(args.cert) != bool(args.key):
        print("make_proxy.py: give both --cert and --key, or neither", file=sys.stderr)
        return 2
    out = args.out.resolve()
    for sub in ("logs", "tmp", "tls"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = args.server_name or [os.uname().nodename, "localhost", "127.0.0.1"]

    worker_user = args.worker_user
    if worker_user is None and os.geteuid() == 0:
        worker_user = "www-data" if _user_exists("www-data") else "nobody"
    gid = pwd.getpwnam(worker_user).pw_gid if worker_user and os.geteuid() == 0 else None
    if gid is not None:
        for sub in ("logs", "tmp"):
            os.chown(out / sub, pwd.getpwnam(worker_user).pw_uid, gid)

    cert, key = (args.cert.resolve(), args.key.resolve()) if args.cert else self_signed(out / "tls", names, args.days)
    admins = {name: (pw, gen) for name, pw, gen in args.admin}
    reviewers = {name: (pw, gen) for name, pw, gen in args.reviewer if name not in admins}
    annotators = {name: (pw, gen) for name, pw, gen in args.annotator if name not in admins and name not in reviewers}
    users = {**annotators, **reviewers, **admins}
    hashed = {n: hash_password(p) for n, (p, _) in users.items()}

    def htpasswd(names: dict) -> str:
        return "".join(f"{n}:{hashed[n]}\n" for n in names)

    write_private(out / "users.htpasswd", htpasswd(users), gid)
    write_private(out / "admins.htpasswd", htpasswd(admins), gid)
    write_private(out / "reviewers.htpasswd", htpasswd({**reviewers, **admins}), gid)
    secret = front_secret(out / "front.secret")
    roles = {**{n: "reviewer" for n in reviewers}, **{n: "admin" for n in admins}}

    site = render("pants_label_site.conf.template", {
        "admins_file": str(out / "admins.htpasswd"),
        "users_file": str(out / "users.htpasswd"),
        "reviewers_file": str(out / "reviewers.htpasswd"),
        "front_secret": secret,
        "role_lines": "".join(f'    "{n}" {r};\n' for n, r in roles.items()).rstrip("\n"),
        "listen": args.listen,
        "server_name": " ".join(names),
        "cert": str(cert),
        "key": str(key),
        "max_body_mb": str(args.max_body_mb),
        "upstream": args.upstream,
        "auth_valid_file": str(out / "auth_valid.json"),
    })
    (out / "auth_valid.json").write_text('{"valid": true}\n')
    write_private(out / "pants_label_site.conf", site, gid)  # holds the front's secret
    user_line = f"user {worker_user};" if worker_user else "# (not started as root: workers run as this user)"
    (out / "nginx.conf").write_text(render("nginx.conf.template", {"dir": str(out), "user_line": user_line}))

    print(f"wrote {out}/nginx.conf and pants_label_site.conf; TLS certificate {cert}")
    print(f"admins: {', '.join(admins)}; reviewers: {', '.join(reviewers) or '-'}; "
          f"annotators: {', '.join(annotators) or '-'}")
    print(f"start the server with: --conf front_secret_file {out / 'front.secret'}")
    for name, (pw, generated) in users.items():
        if generated:
            print(f"  generated password for {name}: {pw}")
    print(f"check: nginx -t -p {out} -c {out}/nginx.conf")
    return 0


def front_secret(path: Path) -> str:
    """The secret in ``path``, made (0600) when missing: kept across runs of this script."""
    if path.is_file():
        secret = path.read_text().strip()
        if len(secret) >= 16:
            return secret
    secret = secrets.token_urlsafe(32)
    write_private(path, secret + "\n", None)
    return secret


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


if __name__ == "__main__":
    sys.exit(main())
