"""Which Prefect API URLs a command may talk to or a server may advertise (security review L9).

Flow parameters, logs and artifacts (thumbnails) cross that connection, so a URL must be ``https://``
or a loopback ``http://`` one.
"""

from __future__ import annotations

import ipaddress
import urllib.parse


def is_loopback_url(url: str) -> bool:
    """True for an ``http(s)`` URL whose host is ``localhost`` or a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(url: str, where: str) -> str:
    """``url`` if it is ``https://`` or loopback ``http://``; else a ConfigError naming ``where``."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and is_loopback_url(url)):
        return url
    from stamp.config import ConfigError

    raise ConfigError(
        f"{where} = {url!r}: flow parameters, logs and artifacts would cross the network in clear text; "
        "use https:// (a TLS proxy in front of the server, README 'Deploying for a hospital') or a loopback URL"
    )
