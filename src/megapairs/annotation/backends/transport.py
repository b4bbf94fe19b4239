"""Where an annotation server's requests go, and whether its API key may go there.

- `is_loopback(host)`: this machine by name or address (`localhost`, `127.x`, `::1`); a
  name is never resolved (a DNS query would itself leave the machine).
- `environment_proxy(url)`: the proxy the environment names for `url` (`HTTP_PROXY`,
  `HTTPS_PROXY`, `ALL_PROXY`, honouring `NO_PROXY`), as the HTTP client will use it,
  without credentials; None when requests go direct.
- `register_endpoint_secrets(endpoint)`: the key and URL passwords redacted from now on.
- `check_transport(...)`: refuses (`SetupError`) to send a key over plain http to a host
  that is not this machine, unless the endpoint sets `allow_insecure`, and then warns once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import urllib.request
from urllib.parse import urlsplit

from megapairs.annotation.types import SetupError
from megapairs.config import EndpointConfig
from megapairs.redaction import register_secret, strip_credentials

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()  # URLs already warned about (once per process)


def endpoint_key(endpoint: EndpointConfig) -> str:
    """The endpoint's API key from the environment ("" when unset)."""
    return os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""


def register_endpoint_secrets(endpoint: EndpointConfig) -> str:
    """Register the endpoint's key and any password in its URLs with `megapairs.redaction`,
    so nothing printed or stored shows them; returns the key."""
    key = endpoint_key(endpoint)
    register_secret(key)
    for url in endpoint.base_urls:
        strip_credentials(url)  # registers a password in the URL
    return key


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine without a lookup: localhost or a loopback IP."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def environment_proxy(url: str) -> str | None:
    """The proxy from the environment that requests to `url` go through, credentials
    stripped; None when there is none or `NO_PROXY` exempts the host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return strip_credentials(proxy)


def check_transport(setting: str, url: str, has_key: bool, allow_insecure: bool) -> None:
    """Refuse a key sent in clear text over http to another machine (`setting`: e.g.
    `annotate.describer`); with `allow_insecure`, warn once instead."""
    parts = urlsplit(url)
    secret = has_key or bool(parts.password)
    if parts.scheme != "http" or not secret or is_loopback(parts.hostname or ""):
        return
    shown = strip_credentials(url)
    proxy = environment_proxy(url)
    via = f" through the proxy {proxy}" if proxy else ""
    if not allow_insecure:
        raise SetupError(
            f"{setting}: refusing to send the API key in clear text over plain http to "
            f"{shown}{via}; use https, or on a network you trust set "
            f"{setting}.allow_insecure=true"
        )
    if shown not in _WARNED:
        _WARNED.add(shown)
        logger.warning(
            "%s: sending the API key in clear text over plain http to %s%s (allow_insecure is set)",
            setting,
            shown,
            via,
        )


def route_text(url: str) -> str:
    """`url` without credentials, with the proxy its requests go through, for a start-up line."""
    proxy = environment_proxy(url)
    shown = strip_credentials(url)
    return f"{shown} via proxy {proxy} (from the environment)" if proxy else shown
