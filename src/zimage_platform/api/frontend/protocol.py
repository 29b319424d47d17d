"""What the browser sees of the login: the cookie, and two small self-contained pages."""

from __future__ import annotations

from html import escape

#: The session cookie: a random token (HttpOnly, SameSite=Strict, Path=/), never the API key.
SESSION_COOKIE = "zimage_session"

#: The login pages load nothing from anywhere, run no script, and post only to this host.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;background:#202020;color:#eee;display:grid;place-items:center;
height:100vh;margin:0}
main{background:#2b2b2b;padding:2rem 2.2rem;border-radius:10px;width:min(28rem,90vw);box-shadow:0 4px 24px #0008}
h1{font-size:1.25rem;margin:0 0 .4rem}p{color:#bbb;margin:.2rem 0 1rem}
input{width:100%;box-sizing:border-box;padding:.6rem;border-radius:6px;border:1px solid #555;background:#181818;
color:#eee;font:14px monospace}
button{margin-top:1rem;padding:.55rem 1.2rem;border:0;border-radius:6px;background:#3b82f6;color:#fff;font-size:15px;
cursor:pointer}
.error{background:#5b1d1d;color:#fcc;padding:.5rem .7rem;border-radius:6px}
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
        f"<body><main>{body}</main></body></html>"
    )


def login_page(error: str | None = None) -> str:
    shown = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return _page(
        "Log in - zimage-platform",
        "<h1>zimage-platform</h1><p>Paste your tenant's API key to open ComfyUI in this browser. "
        "The key is checked once; the browser keeps only a session cookie.</p>"
        f'{shown}<form method="post" action="login"><label for="api_key">API key</label>'
        '<input id="api_key" name="api_key" type="password" autocomplete="current-password" '
        'placeholder="zk_..." required autofocus><button type="submit">Log in</button></form>',
    )


def logout_page(tenant: str) -> str:
    return _page(
        "Log out - zimage-platform",
        f"<h1>Logged in as {escape(tenant)}</h1><p>End this browser's session (the API key stays valid).</p>"
        '<form method="post" action="logout"><button type="submit">Log out</button></form>',
    )
