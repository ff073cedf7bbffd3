"""An OpenRTB 2.5-like traffic model and a bidder that answers it.

``Traffic(seed)`` makes bid requests (~1-2 KB of JSON) with the variation real
exchange traffic has: random ids, IPs and user ids in every request, but sites,
publishers, user agents, geos and banner sizes drawn from small pools.  The
same seed gives the same requests.  ``answer(body)`` is the bidder's decision:
about 60% 204 no-bid, else a bid response of ~400-900 bytes that echoes the
request id.  It depends only on the request, so the bidder can run in its own
process: ``python bench/rtb.py serve`` prints ``listening on HOST:PORT``.

The bidder is a small threaded HTTP/1.1 keep-alive server on stdlib sockets
that always sends Content-Length.  Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import threading

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/118.0.5993.118 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36 Edg/119.0.2151.72",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/119.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) CriOS/119.0.6045.109 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-S908B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/118.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.6045.66 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 12; SM-A525F) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 11; Redmi Note 8 Pro) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; moto g power (2022)) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/118.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/109.0.0.0 Safari/537.36",
]

# country, region, city, lat, lon, ISP-ish first octets
GEOS = [
    ("USA", "CA", "Los Angeles", 34.05, -118.24), ("USA", "NY", "New York", 40.71, -74.01),
    ("USA", "TX", "Houston", 29.76, -95.37), ("USA", "IL", "Chicago", 41.88, -87.63),
    ("USA", "FL", "Miami", 25.76, -80.19), ("USA", "WA", "Seattle", 47.61, -122.33),
    ("GBR", "ENG", "London", 51.51, -0.13), ("GBR", "ENG", "Manchester", 53.48, -2.24),
    ("DEU", "BE", "Berlin", 52.52, 13.40), ("DEU", "BY", "Munich", 48.14, 11.58),
    ("FRA", "IDF", "Paris", 48.86, 2.35), ("FRA", "ARA", "Lyon", 45.76, 4.84),
    ("ESP", "MD", "Madrid", 40.42, -3.70), ("ITA", "LO", "Milan", 45.46, 9.19),
    ("NLD", "NH", "Amsterdam", 52.37, 4.90), ("POL", "MZ", "Warsaw", 52.23, 21.01),
    ("BRA", "SP", "Sao Paulo", -23.55, -46.63), ("MEX", "CMX", "Mexico City", 19.43, -99.13),
    ("CAN", "ON", "Toronto", 43.65, -79.38), ("AUS", "NSW", "Sydney", -33.87, 151.21),
    ("JPN", "13", "Tokyo", 35.68, 139.69), ("IND", "MH", "Mumbai", 19.08, 72.88),
]

BANNER_SIZES = [(300, 250), (728, 90), (320, 50), (160, 600), (300, 600), (970, 250),
                (336, 280), (468, 60), (320, 100), (250, 250)]
IAB_CATS = ["IAB1", "IAB2", "IAB3", "IAB9", "IAB12", "IAB17", "IAB18", "IAB19", "IAB20", "IAB22"]
WORDS = ["news", "sports", "tech", "recipes", "travel", "finance", "weather", "games", "music",
         "movies", "health", "style", "autos", "science", "politics", "home", "garden", "pets"]
TLDS = [".com", ".net", ".co.uk", ".de", ".fr", ".io", ".org"]
ADVERTISERS = ["acme-shoes.com", "brightbank.com", "cloudhost.io", "fastcars.de", "greenleaf.org",
               "hotelnow.com", "kitchenpro.co.uk", "mobigame.net", "sunnytravel.fr", "techmart.com"]


# The headers an exchange sends with each bid request.
HEADERS = {"Content-Type": "application/json", "X-Openrtb-Version": "2.5",
           "User-Agent": "rtb-exchange/1.0"}


class Traffic:
    """Seeded generator of OpenRTB 2.5 bid requests (JSON bytes)."""

    def __init__(self, seed: int = 1):
        self.rng = random.Random(seed)
        r = self.rng
        self.sites = []
        for i in range(50):
            domain = f"{r.choice(WORDS)}{r.choice(WORDS)}{r.randint(1, 99)}{r.choice(TLDS)}"
            pages = [f"https://www.{domain}/{r.choice(WORDS)}/{r.choice(WORDS)}-"
                     f"{r.randint(1000, 99999)}.html" for _ in range(5)]
            self.sites.append({
                "id": str(10000 + i), "domain": domain, "pages": pages,
                "cat": r.sample(IAB_CATS, r.randint(1, 3)),
                "publisher": {"id": "pub-%06d" % r.randint(0, 999999),
                              "name": domain.split(".")[0].title() + " Media"},
            })

    def _hex(self, n: int) -> str:
        return "%0*x" % (n, self.rng.getrandbits(4 * n))

    def _uuid(self) -> str:
        h = self._hex(32)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"

    def request(self) -> bytes:
        r = self.rng
        site = r.choice(self.sites)
        country, region, city, lat, lon = r.choice(GEOS)
        ua = r.choice(USER_AGENTS)
        mobile = "Mobile" in ua or "iPad" in ua
        imps = []
        for n in range(r.choice((1, 1, 1, 2, 2, 3))):
            w, h = r.choice(BANNER_SIZES)
            imp = {"id": str(n + 1),
                   "banner": {"w": w, "h": h, "format": [{"w": w, "h": h}], "pos": r.choice((0, 1, 3)),
                              "battr": [1, 3, 5, 6, 8, 9, 10, 14]},
                   "tagid": f"{site['domain'].split('.')[0]}-slot-{r.randint(1, 12)}",
                   "bidfloor": round(r.uniform(0.05, 2.5), 4), "bidfloorcur": "USD",
                   "secure": 1, "ext": {"gpid": f"/{site['publisher']['id']}/{r.choice(WORDS)}"}}
            if r.random() < 0.15:
                del imp["banner"]
                imp["video"] = {"mimes": ["video/mp4", "video/webm", "application/javascript"],
                                "minduration": 5, "maxduration": r.choice((15, 30, 60)),
                                "protocols": [2, 3, 5, 6], "w": 640, "h": 480,
                                "linearity": 1, "skip": r.choice((0, 1)), "playbackmethod": [2]}
            imps.append(imp)
        req = {
            "id": self._uuid(),
            "imp": imps,
            "site": {"id": site["id"], "domain": site["domain"], "page": r.choice(site["pages"]),
                     "ref": f"https://www.google.com/search?q={r.choice(WORDS)}+{r.choice(WORDS)}",
                     "cat": site["cat"], "publisher": site["publisher"]},
            "device": {"ua": ua,
                       "ip": "%d.%d.%d.%d" % (r.randint(1, 223), r.randint(0, 255),
                                              r.randint(0, 255), r.randint(1, 254)),
                       "geo": {"country": country, "region": region, "city": city,
                               "lat": round(lat + r.uniform(-0.2, 0.2), 4),
                               "lon": round(lon + r.uniform(-0.2, 0.2), 4), "type": 2},
                       "devicetype": 4 if mobile else 2, "language": r.choice(("en", "de", "fr", "es")),
                       "js": 1, "dnt": 0},
            "user": {"id": self._hex(32), "buyeruid": self._hex(r.choice((16, 24, 32))),
                     "ext": {"consent": "CP" + self._hex(40)}},
            "at": 1, "tmax": r.choice((120, 150, 200, 250)), "cur": ["USD"],
            "bcat": ["IAB25", "IAB26", "IAB7-39", "IAB8-18"],
            "source": {"tid": self._uuid(), "ext": {"schain": {"ver": "1.0", "complete": 1, "nodes": [
                {"asi": "exchange.example", "sid": site["publisher"]["id"], "hp": 1}]}}},
            "regs": {"coppa": 0, "ext": {"gdpr": int(country in ("GBR", "DEU", "FRA", "ESP", "ITA",
                                                                 "NLD", "POL")),
                                         "us_privacy": "1YNN" if country == "USA" else "1---"}},
            "ext": {"prebid": {"channel": {"name": "web", "version": "8.26.0"}}},
        }
        return json.dumps(req, separators=(",", ":")).encode()


def answer(body: bytes) -> tuple[int, bytes]:
    """The bidder's reply to one bid request: (204, b"") or (200, bid JSON).

    Deterministic in the request (its id decides bid/no-bid and the price)."""
    req = json.loads(body)
    digest = hashlib.blake2b(req["id"].encode(), digest_size=8).digest()
    if digest[0] < 154:                         # ~60% no-bid
        return 204, b""
    domain = req["site"]["domain"]
    bids = []
    for k, imp in enumerate(req["imp"][:2]):
        w = imp.get("banner", imp.get("video", {})).get("w", 300)
        h = imp.get("banner", imp.get("video", {})).get("h", 250)
        price = round(imp["bidfloor"] * (1.1 + digest[1 + k] / 255), 4)
        crid = "cr-%02x%02x%02x" % (digest[3], digest[4], k)
        adv = ADVERTISERS[digest[5 + k] % len(ADVERTISERS)]
        bids.append({
            "id": "%s-%d" % (digest.hex(), k), "impid": imp["id"], "price": price,
            "adm": (f'<a href="https://click.{adv}/c?s={domain}&amp;cr={crid}">'
                    f'<img src="https://cdn.{adv}/{w}x{h}/{crid}.jpg" width="{w}" height="{h}"></a>'),
            "adomain": [adv], "crid": crid, "w": w, "h": h,
            "nurl": f"https://win.bidder.example/n?id={req['id']}&p=${{AUCTION_PRICE}}",
        })
        if digest[7] & 1:                        # most answers bid on one imp only
            break
    resp = {"id": req["id"], "seatbid": [{"seat": "bidder-%d" % (digest[6] % 4), "bid": bids}],
            "cur": "USD", "bidid": digest.hex()}
    return 200, json.dumps(resp, separators=(",", ":")).encode()


class Bidder:
    """Threaded HTTP/1.1 keep-alive server: one thread per connection."""

    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.addr = "%s:%d" % self.sock.getsockname()

    def serve_forever(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline(8192)
                if not line:
                    return
                length = 0
                while True:                     # headers: at most 100 lines
                    h = f.readline(8192)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = f.read(length) if length else b""
                try:
                    status, out = answer(body)
                except (ValueError, KeyError, TypeError):
                    status, out = 400, b'{"error":"bad bid request"}'
                if status == 204:
                    c.sendall(b"HTTP/1.1 204 No Content\r\nX-Bidder: rtb\r\n\r\n")
                else:
                    c.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                              b"X-Bidder: rtb\r\nContent-Length: %d\r\n\r\n%s"
                              % (status, b"OK" if status == 200 else b"Bad Request", len(out), out))
        except OSError:
            pass
        finally:
            c.close()


def main() -> int:
    if sys.argv[1:2] != ["serve"]:
        t = Traffic(1)
        sizes = sorted(len(t.request()) for _ in range(2000))
        print(f"request bodies: min {sizes[0]} median {sizes[1000]} max {sizes[-1]}")
        print(Traffic(1).request().decode())
        return 0
    b = Bidder()
    print(f"listening on {b.addr}", flush=True)
    b.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
