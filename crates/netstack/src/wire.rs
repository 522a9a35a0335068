//! Wire formats: parsing and building Ethernet, ARP, IPv4, ICMP and TCP.
//!
//! Parsers take untrusted bytes and return `None` for anything malformed; they never
//! index out of bounds and never panic. Builders produce complete frames with checksums.

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV4: u16 = 0x0800;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// The Internet checksum (RFC 1071) over `parts`, as if concatenated.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        let mut bytes = *part;
        if let Some(hi) = odd.take() {
            if let Some((&lo, rest)) = bytes.split_first() {
                sum += u32::from(u16::from_be_bytes([hi, lo]));
                bytes = rest;
            } else {
                odd = Some(hi);
                continue;
            }
        }
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            odd = Some(*last);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub struct Ethernet<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_ethernet(f: &[u8]) -> Option<Ethernet<'_>> {
    if f.len() < 14 {
        return None;
    }
    Some(Ethernet {
        dst: f[0..6].try_into().ok()?,
        src: f[6..12].try_into().ok()?,
        ethertype: be16(f, 12)?,
        payload: &f[14..],
    })
}

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ip,
    pub tpa: Ip,
}

pub fn parse_arp(p: &[u8]) -> Option<Arp> {
    if p.len() < 28 || be16(p, 0)? != 1 || be16(p, 2)? != ETH_IPV4 || p[4] != 6 || p[5] != 4 {
        return None;
    }
    Some(Arp {
        op: be16(p, 6)?,
        sha: p[8..14].try_into().ok()?,
        spa: p[14..18].try_into().ok()?,
        tpa: p[24..28].try_into().ok()?,
    })
}

pub fn arp_frame(op: u16, sha: Mac, spa: Ip, tha: Mac, tpa: Ip, eth_dst: Mac) -> Vec<u8> {
    let mut f = ethernet(eth_dst, sha, ETH_ARP, 28);
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&ETH_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

pub struct Ipv4<'a> {
    pub src: Ip,
    pub dst: Ip,
    pub proto: u8,
    pub payload: &'a [u8],
}

/// Why an IPv4 packet was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Ipv4Reject {
    Malformed,
    /// A fragment: this stack does not reassemble.
    Fragment,
}

pub fn parse_ipv4(p: &[u8]) -> Result<Ipv4<'_>, Ipv4Reject> {
    use Ipv4Reject::*;
    let first = *p.first().ok_or(Malformed)?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || p.len() < ihl {
        return Err(Malformed);
    }
    let total = usize::from(be16(p, 2).ok_or(Malformed)?);
    if total < ihl || total > p.len() {
        return Err(Malformed);
    }
    if checksum(&[&p[..ihl]]) != 0 {
        return Err(Malformed);
    }
    let frag = be16(p, 6).ok_or(Malformed)?;
    if frag & 0x2000 != 0 || frag & 0x1fff != 0 {
        return Err(Fragment);
    }
    Ok(Ipv4 {
        src: p[12..16].try_into().map_err(|_| Malformed)?,
        dst: p[16..20].try_into().map_err(|_| Malformed)?,
        proto: p[9],
        payload: &p[ihl..total],
    })
}

/// Append an IPv4 header for a payload of `len` bytes to `f`.
pub fn push_ipv4(f: &mut Vec<u8>, id: u16, proto: u8, src: Ip, dst: Ip, len: usize) {
    let start = f.len();
    let total = (20 + len) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let c = checksum(&[&f[start..start + 20]]);
    f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}

#[derive(Debug, Clone, Default)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
}

pub struct Tcp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: TcpOptions,
    pub payload: &'a [u8],
}

/// Parse a TCP segment, verifying its checksum against the pseudo-header.
pub fn parse_tcp<'a>(src: Ip, dst: Ip, s: &'a [u8]) -> Option<Tcp<'a>> {
    if s.len() < 20 {
        return None;
    }
    let off = usize::from(s[12] >> 4) * 4;
    if off < 20 || off > s.len() {
        return None;
    }
    let len = (s.len() as u16).to_be_bytes();
    let pseudo = [
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, PROTO_TCP, len[0],
        len[1],
    ];
    if checksum(&[&pseudo, s]) != 0 {
        return None;
    }
    let mut options = TcpOptions::default();
    let mut o = &s[20..off];
    while let Some(&kind) = o.first() {
        match kind {
            0 => break,
            1 => o = &o[1..],
            _ => {
                let l = usize::from(*o.get(1)?);
                if l < 2 || l > o.len() {
                    return None;
                }
                match (kind, l) {
                    (2, 4) => options.mss = be16(o, 2),
                    (3, 3) => options.wscale = Some(o[2].min(14)),
                    _ => {}
                }
                o = &o[l..];
            }
        }
    }
    Some(Tcp {
        src_port: be16(s, 0)?,
        dst_port: be16(s, 2)?,
        seq: be32(s, 4)?,
        ack: be32(s, 8)?,
        flags: s[13],
        window: be16(s, 14)?,
        options,
        payload: &s[off..],
    })
}

/// Everything needed to build one outgoing TCP segment.
pub struct TcpOut<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ip,
    pub dst_ip: Ip,
    pub ip_id: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: TcpOptions,
    pub payload: &'a [u8],
}

pub fn tcp_frame(t: &TcpOut) -> Vec<u8> {
    let mut opts = Vec::new();
    if let Some(mss) = t.options.mss {
        opts.extend_from_slice(&[2, 4]);
        opts.extend_from_slice(&mss.to_be_bytes());
    }
    if let Some(ws) = t.options.wscale {
        opts.extend_from_slice(&[1, 3, 3, ws]);
    }
    let hlen = 20 + opts.len();
    let seg_len = hlen + t.payload.len();
    let mut f = ethernet(t.dst_mac, t.src_mac, ETH_IPV4, 20 + seg_len);
    push_ipv4(&mut f, t.ip_id, PROTO_TCP, t.src_ip, t.dst_ip, seg_len);
    let start = f.len();
    f.extend_from_slice(&t.src_port.to_be_bytes());
    f.extend_from_slice(&t.dst_port.to_be_bytes());
    f.extend_from_slice(&t.seq.to_be_bytes());
    f.extend_from_slice(&t.ack.to_be_bytes());
    f.extend_from_slice(&[((hlen / 4) as u8) << 4, t.flags]);
    f.extend_from_slice(&t.window.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(&opts);
    f.extend_from_slice(t.payload);
    let len = (seg_len as u16).to_be_bytes();
    let (s, d) = (t.src_ip, t.dst_ip);
    let pseudo = [
        s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], 0, PROTO_TCP, len[0], len[1],
    ];
    let c = checksum(&[&pseudo, &f[start..]]);
    f[start + 16..start + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// An ICMP echo reply to an echo request `req` (the ICMP message, header included).
pub fn icmp_echo_reply(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ip,
    dst: Ip,
    ip_id: u16,
    req: &[u8],
) -> Option<Vec<u8>> {
    if req.len() < 8 || req[0] != 8 || checksum(&[req]) != 0 {
        return None;
    }
    let mut f = ethernet(dst_mac, src_mac, ETH_IPV4, 20 + req.len());
    push_ipv4(&mut f, ip_id, PROTO_ICMP, src, dst, req.len());
    let start = f.len();
    f.extend_from_slice(req);
    f[start] = 0;
    f[start + 2] = 0;
    f[start + 3] = 0;
    let c = checksum(&[&f[start..]]);
    f[start + 2..start + 4].copy_from_slice(&c.to_be_bytes());
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2, so the checksum is !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Split at an odd boundary: same result.
        assert_eq!(checksum(&[&data[..3], &data[3..]]), !0xddf2);
    }

    #[test]
    fn built_tcp_segments_parse_back() {
        let f = tcp_frame(&TcpOut {
            src_mac: [2; 6],
            dst_mac: [4; 6],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 0, 0, 2],
            ip_id: 7,
            src_port: 80,
            dst_port: 5555,
            seq: 1000,
            ack: 2000,
            flags: TCP_SYN | TCP_ACK,
            window: 512,
            options: TcpOptions {
                mss: Some(1460),
                wscale: Some(7),
            },
            payload: b"hello",
        });
        let eth = parse_ethernet(&f).unwrap();
        let ip = parse_ipv4(eth.payload).unwrap();
        let tcp = parse_tcp(ip.src, ip.dst, ip.payload).unwrap();
        assert_eq!(
            (tcp.src_port, tcp.dst_port, tcp.seq, tcp.ack),
            (80, 5555, 1000, 2000)
        );
        assert_eq!(tcp.options.mss, Some(1460));
        assert_eq!(tcp.options.wscale, Some(7));
        assert_eq!(tcp.payload, b"hello");
        // One flipped payload bit fails the checksum.
        let mut bad = f.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let eth = parse_ethernet(&bad).unwrap();
        let ip = parse_ipv4(eth.payload).unwrap();
        assert!(parse_tcp(ip.src, ip.dst, ip.payload).is_none());
    }
}
