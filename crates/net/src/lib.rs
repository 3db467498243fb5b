//! rvirt virtual networks: bridges, TAPs, dnsmasq and nftables.
