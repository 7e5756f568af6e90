#!/usr/bin/env python3
"""Horovod host discovery on Kubernetes: print ``podIP:slots`` for every Running, Ready worker pod.

usage: discover_k8s_pods.py [-h] [--selector SELECTOR] [--namespace NS] [--slots N] [--api-server URL]
                            [--token-file PATH] [--ca-file PATH] [--timeout SECONDS]

Lists the pods matching a label selector through the Kubernetes REST API with the pod's own service
account (token and CA under /var/run/secrets/kubernetes.io/serviceaccount), so the service account
needs "list" on pods in its namespace (k8s/overlays/elastic grants it). Only the standard library is
used: no kubectl, no kubernetes client package.

A pod counts when its phase is Running, its Ready condition is True, it has an IP and it is not being
deleted; pods are printed in name order. horovodrun calls the script without arguments, so every
option has an environment default:

    --selector   $DTRAIN_POD_SELECTOR   e.g. training.kubeflow.org/job-name=dtrain,training.kubeflow.org/job-role=worker
    --namespace  $POD_NAMESPACE, else the service account's namespace file
    --slots      $DTRAIN_SLOTS, else 1 (ranks per pod: GPUs per pod on GPU nodes)
    --api-server https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT

Exit status: 0 with the hosts on stdout (possibly none); 1 when the API cannot be asked (horovodrun
then fails the job at start-up and retries later discoveries); 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# ---- pure functions (unit-tested without a cluster) ------------------------------------------------


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready, with an IP, and not terminating."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def ready_pod_hosts(pod_list: Mapping[str, Any], slots: int = 1) -> list[str]:
    """``podIP:slots`` for the ready pods of a ``PodList`` (as the API returns it), in pod-name order."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    pods = [p for p in pod_list.get("items") or [] if pod_is_ready(p)]
    pods.sort(key=lambda p: (p.get("metadata") or {}).get("name", ""))
    return [f"{p['status']['podIP']}:{slots}" for p in pods]


def api_server_from_env(env: Mapping[str, str]) -> str:
    """The in-cluster API server URL from the variables Kubernetes sets in every pod."""
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ValueError("KUBERNETES_SERVICE_HOST is not set (not in a pod?); pass --api-server")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"https://{host}:{port}"


def pods_url(api_server: str, namespace: str, selector: str) -> str:
    """``GET`` URL listing the pods of ``namespace`` that match the label ``selector``."""
    if not namespace:
        raise ValueError("no namespace")
    query = urllib.parse.urlencode({"labelSelector": selector})
    ns = urllib.parse.quote(namespace, safe="")
    return f"{api_server.rstrip('/')}/api/v1/namespaces/{ns}/pods?{query}"


# ---- I/O -------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def fetch_pod_list(url: str, token: str | None, ca_file: str | None, timeout: float) -> dict[str, Any]:
    """GET a PodList as JSON with a bearer token, verifying the server against ``ca_file``."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca_file if ca_file and os.path.exists(ca_file) else None)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.load(response)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="discover_k8s_pods.py",
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--selector", default=env.get("DTRAIN_POD_SELECTOR"),
                        help="label selector of the worker pods (default: $DTRAIN_POD_SELECTOR)")
    parser.add_argument("--namespace", default=env.get("POD_NAMESPACE"),
                        help="namespace (default: $POD_NAMESPACE, else the service account's)")
    parser.add_argument("--slots", type=int, default=int(env.get("DTRAIN_SLOTS", "1")),
                        help="ranks per pod (default: $DTRAIN_SLOTS or 1)")
    parser.add_argument("--api-server", help="API server URL (default: from KUBERNETES_SERVICE_HOST/PORT)")
    parser.add_argument("--token-file", default=f"{SA_DIR}/token", help="bearer token file (default: %(default)s)")
    parser.add_argument("--ca-file", default=f"{SA_DIR}/ca.crt", help="CA bundle (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.selector:
        parser.error("no label selector: pass --selector or set DTRAIN_POD_SELECTOR")
    if args.slots < 1:
        parser.error(f"--slots must be >= 1, got {args.slots}")
    namespace = args.namespace or _read(f"{SA_DIR}/namespace")
    if not namespace:
        parser.error("no namespace: pass --namespace, set POD_NAMESPACE, or run in a pod")
    try:
        url = pods_url(args.api_server or api_server_from_env(env), namespace, args.selector)
        pod_list = fetch_pod_list(url, _read(args.token_file), args.ca_file, args.timeout)
    except (OSError, ValueError, urllib.error.URLError) as e:
        print(f"discover_k8s_pods.py: cannot list pods ({args.selector!r} in {namespace}): {e}", file=sys.stderr)
        return 1
    hosts = ready_pod_hosts(pod_list, args.slots)
    sys.stdout.write("".join(f"{h}\n" for h in hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
