"""The layer that joins the client side (orproxy.http) and the origin side
(orproxy.upstream): the connection loop, forwarding, the attempt loop, the body relay and
the proxy's own answers."""
