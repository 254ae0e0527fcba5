"""How much AuthorizationPolicy costs a sidecar's LDS generation.

A sidecar of ``ratings`` in west with N policies selecting it (half ALLOW, half DENY, each rule using principals,
namespaces, paths, methods, ports and source.cluster) plus 1,000 policies selecting another workload. Prints the
time per sidecar for the first replica of the workload in a PushContext (selection and compilation) and for each
further replica (memoized), and the ratio against the same sidecar with no policy at all, measured in the same run.

    .venv/bin/python bench/authz.py [--policies 0,10,100,1000] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from discovery.authz import AuthorizationPolicy  # noqa: E402
from discovery.convert import convert  # noqa: E402
from discovery.model import (  # noqa: E402
    ClusterId,
    Endpoint,
    Registry,
    Service,
    ServiceKey,
    ServicePort,
    namespace,
)
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext  # noqa: E402
from gateway.generators import lds  # noqa: E402

TD = "bench.meshfed.local"
WEST = ClusterId("west")
RATINGS = ServiceKey.parse("ratings.default")


def policy(i: int, app: str) -> AuthorizationPolicy:
    out = convert({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": f"p{i}", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "action": "DENY" if i % 2 else "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/s{i}"], "namespaces": ["x*"]}}],
                            "to": [{"operation": {"paths": ["/a/*", "*.js"], "methods": ["GET"], "ports": ["9080"]}}],
                            "when": [{"key": "source.cluster", "values": ["east"]}]}]}}, cluster=WEST)
    assert isinstance(out, AuthorizationPolicy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="0,10,100,1000")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    service = Service(cluster=WEST, key=RATINGS, ports=(ServicePort(port=9080, name="http"),),
                      endpoints=(Endpoint(address="10.0.0.1", ports=(("http", 15006),)),),
                      selector=(("app", "ratings"),))
    registry = Registry(local=WEST).with_shard(WEST, [service], [])
    proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=WEST, namespace=namespace("default"), node_id="s~0",
                      services=(RATINGS,), inbound=(InboundPort(15006, 9080, "http"),))
    others = tuple(policy(10**6 + i, "other") for i in range(1000))
    baseline = 0.0
    print(f"{'policies':>8} {'first ms':>9} {'ratio':>7} {'replica ms':>11} {'ratio':>7}")
    for n in [int(x) for x in args.policies.split(",")]:
        authz = tuple(policy(i, "ratings") for i in range(n)) + others
        t = time.perf_counter()
        for _ in range(args.reps):
            lds.generate(proxy, None, PushContext(registry=registry, trust_domain=TD, authz=authz))
        first = (time.perf_counter() - t) / args.reps
        ctx = PushContext(registry=registry, trust_domain=TD, authz=authz)
        lds.generate(proxy, None, ctx)
        t = time.perf_counter()
        for i in range(args.reps):
            lds.generate(replace(proxy, node_id=f"s~{i + 1}"), None, ctx)
        further = (time.perf_counter() - t) / args.reps
        if not baseline:
            no_policy = PushContext(registry=registry, trust_domain=TD)
            t = time.perf_counter()
            for _ in range(args.reps):
                lds.generate(proxy, None, replace(no_policy))
            baseline = (time.perf_counter() - t) / args.reps
            print(f"{'none':>8} {baseline * 1e3:9.2f} {1.0:7.1f} {'':>11} {'':>7}   (baseline: no AuthorizationPolicy)")
        print(f"{n:8d} {first * 1e3:9.2f} {first / baseline:7.1f} {further * 1e3:11.2f} {further / baseline:7.1f}")


if __name__ == "__main__":
    main()
