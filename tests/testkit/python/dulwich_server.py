"""A git server of another implementation than git's own, for gitstate's tests: dulwich.

    python dulwich_server.py git|http ROOT PORT

serves every repository under ROOT on 127.0.0.1:PORT, over git:// (dulwich.server's
TCPGitServer) or smart HTTP (dulwich.web's WSGI application behind wsgiref, one thread per
request). Push is enabled. Runs until killed.
"""
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from dulwich.server import FileSystemBackend, TCPGitServer
from dulwich.web import make_wsgi_chain


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))


def main():
    mode, root, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backend = FileSystemBackend(root)
    if mode == "git":
        server = TCPGitServer(backend, "127.0.0.1", port)
    elif mode == "http":
        server = make_server(
            "127.0.0.1", port, make_wsgi_chain(backend), server_class=ThreadingWSGIServer, handler_class=QuietHandler
        )
    else:
        sys.exit("usage: dulwich_server.py git|http ROOT PORT")
    sys.stderr.write("dulwich %s server on 127.0.0.1:%d serving %s\n" % (mode, port, root))
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
