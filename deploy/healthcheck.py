"""Container HEALTHCHECK: exit 0 when $DBPOOL_HEALTHCHECK_URL answers 200, else print one line and exit 1."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9188/-/healthy"


def main() -> int:
    url = os.environ.get("DBPOOL_HEALTHCHECK_URL") or DEFAULT_URL
    timeout = float(os.environ.get("DBPOOL_HEALTHCHECK_TIMEOUT", "4"))
    context = None
    if url.startswith("https:") and os.environ.get("DBPOOL_HEALTHCHECK_INSECURE") == "1":
        # A self-signed certificate from --web.config.file: the check runs over loopback inside the container.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:  # refused, timed out, TLS failure, malformed URL
        print(f"unhealthy: {url}: {getattr(e, 'reason', None) or e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
