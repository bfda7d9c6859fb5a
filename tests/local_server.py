"""An https server on 127.0.0.1 for the download tests (tests/test_vgg.py, tests/test_datasets.py).

Downloads are https only, so the tests serve over TLS with a self-signed certificate made
here (``cryptography``) and trusted through ``REQUESTS_CA_BUNDLE`` while the server runs.
Nothing leaves this computer.  Routes: ``{path: (kind, body)}`` with kind 'ok', 'drop'
(half the body, then hang up), 'stall' (a little, then silence) or 'redirect' (to body); ``hits`` counts the
requests per path and ``cookies`` records the Cookie header of each.
"""
import contextlib
import datetime
import http.server
import ipaddress
import os
import ssl
import threading
from collections import Counter, defaultdict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_cert(folder):
    """(cert.pem, key.pem) in folder for the address 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.hits[self.path] += 1
        server.cookies[self.path].append(self.headers.get("Cookie"))
        if self.path not in server.routes:
            self.send_error(404)
            return
        kind, body = server.routes[self.path]
        if kind == "redirect":                       # body: where to
            self.send_response(302)
            self.send_header("Location", body)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "ok":
            self.wfile.write(body)
        elif kind == "drop":                         # half the body, then hang up
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
        elif kind == "stall":                        # a little, then silence
            self.wfile.write(body[:10])
            self.wfile.flush()
            server.release.wait(5)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def https_server(folder, routes):
    """Serve ``routes`` over https on 127.0.0.1 (``server.url``) with requests trusting it."""
    cert_path, key_path = self_signed_cert(folder)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.routes, httpd.hits, httpd.release = routes, Counter(), threading.Event()
    httpd.cookies = defaultdict(list)
    httpd.url = f"https://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    old = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = cert_path
    try:
        yield httpd
    finally:
        if old is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = old
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()

