"""Workload certificate signing throughput, against raw P-256 signing measured in the same run.

    .venv/bin/python bench/ca.py [--csrs 2000] [--rounds 5]

Prints, for one core (this process is single-threaded):
  * certificates/s: PEM CSR -> verified, checked and signed PEM chain (``sign_csr``), CSRs made beforehand;
  * raw ECDSA P-256 signatures/s and verifications/s from ``cryptography`` (the floor of what a cert costs:
    one CSR signature check plus one certificate signature);
  * the ratios. Best of ``--rounds`` rounds, to dampen noise from other processes on the machine.
"""

# ruff: noqa: E402 - the script's own directory must leave sys.path before the federation package is imported

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], and bench/federation.py would shadow the federation package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust import SpiffeId, TrustDomain, create_intermediate, create_root, make_csr, sign_csr

GOAL = 3500


def best_rate(n: int, rounds: int, fn: Callable[[], None]) -> float:
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csrs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, rounds = args.csrs, args.rounds

    td = TrustDomain("bench.example")
    root = create_root(td)
    ca = create_intermediate(root, SpiffeId.cluster(td, "east"))
    ids = [SpiffeId.workload(td, f"ns{i % 50}", f"sa{i}") for i in range(n)]
    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1()), sid) for sid in ids]
    work = list(zip(csrs, ids, strict=True))

    def sign_all() -> None:
        for csr, sid in work:
            sign_csr(ca, csr, identity=sid)

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    tbs = os.urandom(420)  # about the size of a leaf's to-be-signed part
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    algo = ec.ECDSA(hashes.SHA256())

    def raw_sign() -> None:
        for _ in range(n):
            key.sign(tbs, algo)

    def raw_verify() -> None:
        for _ in range(n):
            pub.verify(sig, tbs, algo)

    # interleave so that background load hits both sides alike
    certs = sigs = verifies = 0.0
    for _ in range(rounds):
        certs = max(certs, best_rate(n, 1, sign_all))
        sigs = max(sigs, best_rate(n, 1, raw_sign))
        verifies = max(verifies, best_rate(n, 1, raw_verify))
    floor = 1.0 / (1.0 / sigs + 1.0 / verifies)

    print(f"meshfed CA bench: {n} CSRs x {rounds} rounds, best round, one core (cpu count {os.cpu_count()})")
    print(f"  certificates/s (CSR -> signed chain)      {certs:10,.0f}   goal >= {GOAL:,}: "
          f"{'met' if certs >= GOAL else 'NOT met'}")
    print(f"  raw P-256 signatures/s (cryptography)     {sigs:10,.0f}")
    print(f"  raw P-256 verifications/s (cryptography)  {verifies:10,.0f}")
    print(f"  ratio certificates / raw signatures       {certs / sigs:10.3f}")
    print(f"  ratio certificates / (1 sign + 1 verify)  {certs / floor:10.3f}   (1.0 = only the crypto costs)")


if __name__ == "__main__":
    main()
