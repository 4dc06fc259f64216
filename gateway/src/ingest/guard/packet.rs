//! Just enough MQTT (3.1.1 and 5) to guard the embedded broker and to end telemetry publishes
//! itself: framing, CONNECT, PUBLISH (topic, packet id, the properties that matter, payload),
//! PUBREL, the filters of a SUBSCRIBE, the acknowledgements and CONNACKs the guard sends, and
//! MQTT 5 DISCONNECTs. Packets are read where they lie in the read buffer; what goes on to the
//! broker is forwarded as the device sent it, except CONNECT, rebuilt with the guard's own
//! login and a client id scoped to the device's identity, and a PUBLISH that names its topic
//! by an alias, which the broker gets with the topic spelled out.

/// Control packet types (MQTT 5 §2.1.2; the same numbers in 3.1.1).
pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const UNSUBSCRIBE: u8 = 10;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// Why bytes from a device are not an MQTT packet the guard can pass on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The device sent a packet larger than the broker takes: close the connection.
    #[error("packet of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// Not MQTT, or not MQTT as the standard spells it: close the connection.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

/// Where one complete packet lies at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    /// Bytes of the fixed header (type byte and remaining length).
    pub header: usize,
    /// Bytes of the whole packet.
    pub len: usize,
}

/// The packet at the front of `buf`, `None` until all of it is there. `limit` bounds the whole
/// packet so that a device cannot make the guard buffer without end.
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<Frame>, PacketError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            let len = header + remaining;
            // Refused as soon as the header says so, before the guard buffers any of it.
            if len > limit {
                return Err(PacketError::TooLarge { size: len, limit });
            }
            if buf.len() < len {
                return Ok(None);
            }
            return Ok(Some(Frame {
                kind: first >> 4,
                flags: first & 0x0f,
                header,
                len,
            }));
        }
    }
    Err(PacketError::Malformed(
        "remaining length longer than four bytes",
    ))
}

/// Whether a connected device may send the packet framed as `frame`: only the kinds MQTT lets
/// a client send, each with the fixed-header flags MQTT gives it (MQTT 5 §2.1.3, 3.1.1
/// §2.2.2), else the connection ends. Checked before anything is forwarded: rumqttd takes
/// some of the rest badly (its MQTT 5 reader panics on a CONNACK or UNSUBACK with a body; its
/// 3.1.1 reader logs a CONNACK and keeps the connection). AUTH is refused too: neither the
/// guard nor rumqttd speaks MQTT 5 enhanced authentication.
pub fn sent_by_device(frame: Frame) -> Result<(), PacketError> {
    let flags = match frame.kind {
        // The flags of a PUBLISH are its dup, QoS and retain ([`publish`] checks them).
        PUBLISH => return Ok(()),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0x02,
        CONNECT | PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT => 0,
        _ => {
            return Err(PacketError::Malformed(
                "a packet type a client may not send",
            ))
        }
    };
    if frame.flags != flags {
        return Err(PacketError::Malformed(
            "reserved fixed-header flags are wrong",
        ));
    }
    Ok(())
}

/// A reader over a packet's body; every read checks its bounds.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(PacketError::Malformed(
                "field runs past the end of the packet",
            ))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PacketError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn binary(&mut self) -> Result<&'a [u8], PacketError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<&'a str, PacketError> {
        std::str::from_utf8(self.binary()?)
            .map_err(|_| PacketError::Malformed("string is not UTF-8"))
    }

    fn varint(&mut self) -> Result<usize, PacketError> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(PacketError::Malformed(
            "variable byte integer longer than four bytes",
        ))
    }

    /// An MQTT 5 property block, length prefix included.
    fn properties(&mut self) -> Result<&'a [u8], PacketError> {
        let start = self.pos;
        let n = self.varint()?;
        self.take(n)?;
        Ok(&self.buf[start..self.pos])
    }

    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// A CONNECT packet, borrowed from the read buffer.
#[derive(Debug)]
pub struct Connect<'a> {
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub level: u8,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub will_topic: Option<&'a str>,
    /// MQTT 5: how long the session outlives the connection (0: it ends with it).
    pub session_expiry: u32,
    /// MQTT 5: how many QoS 1 and 2 messages the device takes unacknowledged at once.
    pub receive_maximum: u16,
    /// MQTT 5: the largest packet the device takes.
    pub maximum_packet_size: Option<u32>,
    protocol_name: &'a [u8],
    flags: u8,
    keep_alive: u16,
    properties: &'a [u8],
    will: &'a [u8],
}

const USERNAME_FLAG: u8 = 0x80;
const PASSWORD_FLAG: u8 = 0x40;
const WILL_FLAG: u8 = 0x04;
const CLEAN_START: u8 = 0x02;

const PAYLOAD_FORMAT: u8 = 0x01;
const SESSION_EXPIRY: u8 = 0x11;
const ASSIGNED_CLIENT_ID: u8 = 0x12;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;

impl<'a> Connect<'a> {
    /// Parses the CONNECT packet `packet` (fixed header included) framed as `frame`.
    pub fn parse(packet: &'a [u8], frame: Frame) -> Result<Self, PacketError> {
        if frame.kind != CONNECT || frame.flags != 0 {
            return Err(PacketError::Malformed("the first packet must be CONNECT"));
        }
        let mut r = Reader::new(&packet[frame.header..frame.len]);
        let name_start = r.pos;
        let name = r.binary()?;
        let protocol_name = &r.buf[name_start..r.pos];
        let level = r.u8()?;
        if name != b"MQTT" || !(level == 4 || level == 5) {
            return Err(PacketError::Malformed(
                "protocol must be MQTT 3.1.1 or MQTT 5",
            ));
        }
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(PacketError::Malformed("reserved CONNECT flag is set"));
        }
        let keep_alive = r.u16()?;
        let properties = if level == 5 { r.properties()? } else { &[] };
        let (mut session_expiry, mut receive_maximum, mut maximum_packet_size) =
            (0, u16::MAX, None);
        if level == 5 {
            let mut p = Reader::new(properties);
            p.varint()?;
            while !p.is_empty() {
                match p.u8()? {
                    SESSION_EXPIRY => session_expiry = p.u32()?,
                    RECEIVE_MAXIMUM => {
                        receive_maximum = p.u16()?;
                        if receive_maximum == 0 {
                            return Err(PacketError::Malformed("receive maximum of 0"));
                        }
                    }
                    MAXIMUM_PACKET_SIZE => {
                        let size = p.u32()?;
                        if size == 0 {
                            return Err(PacketError::Malformed("maximum packet size of 0"));
                        }
                        maximum_packet_size = Some(size);
                    }
                    id => skip_property(&mut p, id)?,
                }
            }
        }
        let client_id = r.string()?;
        let will_start = r.pos;
        let will_topic = if flags & WILL_FLAG != 0 {
            if level == 5 {
                r.properties()?;
            }
            let topic = r.string()?;
            r.binary()?;
            Some(topic)
        } else {
            None
        };
        let will = &r.buf[will_start..r.pos];
        let username = if flags & USERNAME_FLAG != 0 {
            Some(r.string()?)
        } else {
            None
        };
        let password = if flags & PASSWORD_FLAG != 0 {
            Some(r.binary()?)
        } else {
            None
        };
        if level == 4 && password.is_some() && username.is_none() {
            // MQTT-3.1.2-22. rumqttd would read it as a login with an empty user name.
            return Err(PacketError::Malformed(
                "a password without a user name (MQTT 3.1.1 allows none)",
            ));
        }
        if !r.is_empty() {
            return Err(PacketError::Malformed("bytes after the CONNECT payload"));
        }
        Ok(Self {
            level,
            client_id,
            username,
            password,
            will_topic,
            session_expiry,
            receive_maximum,
            maximum_packet_size,
            protocol_name,
            flags,
            keep_alive,
            properties,
            will,
        })
    }

    /// Seconds the device may stay silent (0: no limit).
    pub fn keep_alive(&self) -> u16 {
        self.keep_alive
    }

    /// The device asks to start afresh (3.1.1: clean session).
    pub fn clean_start(&self) -> bool {
        self.flags & CLEAN_START != 0
    }

    /// Whether rumqttd keeps a session for this client after the connection ends. rumqttd
    /// reads only the clean-start flag, as 3.1.1's clean session: it ignores MQTT 5's session
    /// expiry, so a session that must outlive the connection (expiry > 0) or that resumes one
    /// (clean start 0) is given to it as a kept session. A clean start with an expiry then
    /// resumes what rumqttd still holds for the client instead of discarding it.
    pub fn keeps_session(&self) -> bool {
        if self.level == 5 {
            !self.clean_start() || self.session_expiry > 0
        } else {
            !self.clean_start()
        }
    }

    /// The same CONNECT with another client id, login and keep-alive, and the session flag
    /// rumqttd understands ([`Self::keeps_session`]): what the guard sends the broker.
    pub fn rebuild(
        &self,
        client_id: &str,
        username: &str,
        password: &[u8],
        keep_alive: u16,
    ) -> Vec<u8> {
        let mut body = Vec::with_capacity(
            self.protocol_name.len()
                + 4
                + self.properties.len()
                + self.will.len()
                + 6
                + client_id.len()
                + username.len()
                + password.len(),
        );
        body.extend_from_slice(self.protocol_name);
        body.push(self.level);
        let clean = if self.keeps_session() { 0 } else { CLEAN_START };
        body.push((self.flags & !CLEAN_START) | clean | USERNAME_FLAG | PASSWORD_FLAG);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(self.properties);
        put_binary(&mut body, client_id.as_bytes());
        body.extend_from_slice(self.will);
        put_binary(&mut body, username.as_bytes());
        put_binary(&mut body, password);
        framed(CONNECT << 4, &body)
    }
}

/// An MQTT 3.1.1 CONNECT with a clean session and a login: how the guard checks that the
/// broker behind it answers.
pub fn connect_v4(client_id: &str, username: &str, password: &[u8], keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(USERNAME_FLAG | PASSWORD_FLAG | CLEAN_START);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_binary(&mut body, client_id.as_bytes());
    put_binary(&mut body, username.as_bytes());
    put_binary(&mut body, password);
    framed(CONNECT << 4, &body)
}

/// A packet: its first byte, the remaining length, then `body`.
pub(crate) fn framed(first: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 5);
    packet.push(first);
    put_varint(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

/// Strings in a rebuilt CONNECT come from a parsed one (each ≤ 65,535 bytes) or from the guard.
fn put_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A PUBLISH, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    /// The topic name; empty when (MQTT 5) an alias stands for it.
    pub name: &'a str,
    pub alias: Option<u16>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// Present for QoS 1 and 2.
    pub packet_id: Option<u16>,
    /// MQTT 5 content type.
    pub content_type: Option<&'a str>,
    /// MQTT 5 payload format indicator 1: the payload says it is UTF-8.
    pub utf8: bool,
    pub payload: &'a [u8],
}

const TOPIC_ALIAS: u8 = 0x23;
const CONTENT_TYPE: u8 = 0x03;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;

/// Parses the PUBLISH `packet` (fixed header included).
pub fn publish(packet: &[u8], frame: Frame, v5: bool) -> Result<Publish<'_>, PacketError> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    let name = r.string()?;
    let qos = (frame.flags >> 1) & 0x03;
    if qos == 3 {
        return Err(PacketError::Malformed("PUBLISH with QoS 3"));
    }
    let packet_id = if qos > 0 {
        let id = r.u16()?;
        if id == 0 {
            return Err(PacketError::Malformed("PUBLISH with packet identifier 0"));
        }
        Some(id)
    } else {
        None
    };
    let mut alias = None;
    let mut content_type = None;
    let mut utf8 = false;
    if v5 {
        let block = r.properties()?;
        let mut p = Reader::new(block);
        p.varint()?;
        while !p.is_empty() {
            match p.u8()? {
                TOPIC_ALIAS => alias = Some(p.u16()?),
                CONTENT_TYPE => content_type = Some(p.string()?),
                PAYLOAD_FORMAT => utf8 = p.u8()? == 1,
                // Only a server sends one (MQTT-3.3.4-6); rumqttd 0.20 miscounts its length
                // and would read the properties after it as payload.
                SUBSCRIPTION_IDENTIFIER => {
                    return Err(PacketError::Malformed(
                        "PUBLISH from a client with a subscription identifier",
                    ))
                }
                id => skip_property(&mut p, id)?,
            }
        }
    }
    Ok(Publish {
        name,
        alias,
        qos,
        retain: frame.flags & 0x01 != 0,
        dup: frame.flags & 0x08 != 0,
        packet_id,
        content_type,
        utf8,
        payload: &r.buf[r.pos..],
    })
}

/// The MQTT 5 PUBLISH `packet` with its topic alias replaced by the topic `name`: the broker
/// never saw the PUBLISH that set the alias if the guard took that one in itself.
pub fn with_topic(packet: &[u8], frame: Frame, name: &str) -> Result<Vec<u8>, PacketError> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    r.string()?;
    let qos = (frame.flags >> 1) & 0x03;
    let mut body = Vec::with_capacity(frame.len + name.len());
    put_binary(&mut body, name.as_bytes());
    if qos > 0 {
        body.extend_from_slice(r.take(2)?);
    }
    let block = r.properties()?;
    let mut p = Reader::new(block);
    p.varint()?;
    let mut kept = Vec::with_capacity(block.len());
    while !p.is_empty() {
        let start = p.pos;
        let id = p.u8()?;
        if id == TOPIC_ALIAS {
            p.u16()?;
        } else {
            skip_property(&mut p, id)?;
            kept.extend_from_slice(&block[start..p.pos]);
        }
    }
    put_varint(&mut body, kept.len());
    body.extend_from_slice(&kept);
    body.extend_from_slice(&r.buf[r.pos..]);
    Ok(framed(packet[0], &body))
}

/// QoS and packet id of a PUBLISH the broker sends a device (`None` when it is not one the
/// guard can read).
pub fn publish_id(packet: &[u8], frame: Frame) -> Option<(u8, Option<u16>)> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    r.binary().ok()?;
    let qos = (frame.flags >> 1) & 0x03;
    let id = if qos > 0 { Some(r.u16().ok()?) } else { None };
    Some((qos, id))
}

/// The packet id and reason code of a PUBACK, PUBREC or PUBCOMP (success when absent).
pub fn ack_of(packet: &[u8], frame: Frame) -> Result<(u16, u8), PacketError> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    let id = r.u16()?;
    let reason = if r.is_empty() { 0 } else { r.u8()? };
    Ok((id, reason))
}

/// The session expiry an MQTT 5 DISCONNECT sets, if it sets one.
pub fn disconnect_expiry(packet: &[u8], frame: Frame) -> Result<Option<u32>, PacketError> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    if r.is_empty() {
        return Ok(None);
    }
    r.u8()?;
    if r.is_empty() {
        return Ok(None);
    }
    let block = r.properties()?;
    let mut p = Reader::new(block);
    p.varint()?;
    let mut expiry = None;
    while !p.is_empty() {
        match p.u8()? {
            SESSION_EXPIRY => expiry = Some(p.u32()?),
            id => skip_property(&mut p, id)?,
        }
    }
    Ok(expiry)
}

/// Session present and the return (3.1.1) or reason (5) code of the broker's CONNACK.
pub fn connack_of(packet: &[u8], frame: Frame) -> Result<(bool, u8), PacketError> {
    if frame.kind != CONNACK {
        return Err(PacketError::Malformed(
            "the broker's first packet is not CONNACK",
        ));
    }
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    let flags = r.u8()?;
    Ok((flags & 0x01 != 0, r.u8()?))
}

/// What the guard tells an MQTT 5 device about itself in CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub topic_alias_maximum: u16,
}

/// The CONNACK that accepts a connection, in the device's protocol version; `assigned` is
/// the client id the guard chose for a device that sent none (MQTT 5 says it).
pub fn connack_accept(
    level: u8,
    session_present: bool,
    limits: &ServerLimits,
    assigned: Option<&str>,
) -> Vec<u8> {
    let flags = u8::from(session_present);
    if level != 5 {
        return vec![0x20, 2, flags, 0];
    }
    let mut props = Vec::with_capacity(16 + assigned.map_or(0, str::len));
    props.push(RECEIVE_MAXIMUM);
    props.extend_from_slice(&limits.receive_maximum.to_be_bytes());
    props.push(MAXIMUM_PACKET_SIZE);
    props.extend_from_slice(&limits.maximum_packet_size.to_be_bytes());
    props.push(TOPIC_ALIAS_MAXIMUM);
    props.extend_from_slice(&limits.topic_alias_maximum.to_be_bytes());
    if let Some(id) = assigned {
        props.push(ASSIGNED_CLIENT_ID);
        put_binary(&mut props, id.as_bytes());
    }
    let mut body = vec![flags, 0];
    put_varint(&mut body, props.len());
    body.extend_from_slice(&props);
    framed(CONNACK << 4, &body)
}

/// The same PUBLISH at QoS 0 (no packet id, nothing to acknowledge): how the guard hands the
/// broker a retained telemetry message it has taken in itself, so that subscribers still get
/// the retained value.
pub fn at_qos0(packet: &[u8], frame: Frame) -> Vec<u8> {
    let body = &packet[frame.header..frame.len];
    let qos = (frame.flags >> 1) & 0x03;
    let mut out = Vec::with_capacity(body.len());
    // Topic name (2 + len), then the packet id for QoS > 0, then the rest.
    let name_len = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    out.extend_from_slice(&body[..name_len]);
    let rest = if qos > 0 { name_len + 2 } else { name_len };
    out.extend_from_slice(&body[rest..]);
    framed((PUBLISH << 4) | (frame.flags & 0x01), &out)
}

/// The packet id of a PUBREL (or any packet that starts with one).
pub fn packet_id(packet: &[u8], frame: Frame) -> Result<u16, PacketError> {
    Reader::new(&packet[frame.header..frame.len]).u16()
}

/// An acknowledgement the guard sends (PUBACK, PUBREC or PUBCOMP): MQTT 5 carries a reason
/// code when it is not success; MQTT 3.1.1 has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    bytes: [u8; 5],
    len: u8,
}

impl Reply {
    pub fn new(kind: u8, packet_id: u16, reason: u8, v5: bool) -> Self {
        let [hi, lo] = packet_id.to_be_bytes();
        let first = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
        if v5 && reason != 0 {
            Self {
                bytes: [first, 3, hi, lo, reason],
                len: 5,
            }
        } else {
            Self {
                bytes: [first, 2, hi, lo, 0],
                len: 4,
            }
        }
    }

    /// The answer to a device's PINGREQ.
    pub fn pingresp() -> Self {
        Self {
            bytes: [PINGRESP << 4, 0, 0, 0, 0],
            len: 2,
        }
    }

    /// MQTT 5: the server ends the connection and says why (§3.14); the last packet sent.
    pub fn disconnect(reason: u8) -> Self {
        Self {
            bytes: [DISCONNECT << 4, 1, reason, 0, 0],
            len: 3,
        }
    }

    pub fn is_disconnect(&self) -> bool {
        self.bytes[0] == DISCONNECT << 4
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// MQTT 5 reason codes the guard answers a PUBLISH with (§3.4.2.1).
/// and a DISCONNECT with (§3.14.2.1).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
}

/// Skips the value of MQTT 5 property `id` (§2.2.2.2).
fn skip_property(r: &mut Reader<'_>, id: u8) -> Result<(), PacketError> {
    match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
            r.u8()?;
        }
        0x13 | 0x21 | 0x22 | 0x23 => {
            r.u16()?;
        }
        0x02 | 0x11 | 0x18 | 0x27 => {
            r.take(4)?;
        }
        0x0B => {
            r.varint()?;
        }
        0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
            r.binary()?;
        }
        0x26 => {
            r.binary()?;
            r.binary()?;
        }
        _ => return Err(PacketError::Malformed("unknown MQTT 5 property")),
    }
    Ok(())
}

/// The topic filters of the SUBSCRIBE `packet` (fixed header included).
pub fn subscribe_filters(packet: &[u8], frame: Frame, v5: bool) -> Result<Vec<&str>, PacketError> {
    let mut r = Reader::new(&packet[frame.header..frame.len]);
    r.u16()?;
    if v5 {
        let mut p = Reader::new(r.properties()?);
        p.varint()?;
        let mut identified = false;
        while !p.is_empty() {
            match p.u8()? {
                // One at most, and not 0 (MQTT 5 §3.8.2.1.2). rumqttd 0.20 counts each one a
                // byte too long: with several, it would take the last properties for the
                // first topic filter and subscribe to filters the guard never checked.
                SUBSCRIPTION_IDENTIFIER => {
                    if identified || p.varint()? == 0 {
                        return Err(PacketError::Malformed(
                            "SUBSCRIBE with a second subscription identifier or one of 0",
                        ));
                    }
                    identified = true;
                }
                id => skip_property(&mut p, id)?,
            }
        }
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
        r.u8()?;
    }
    if filters.is_empty() {
        return Err(PacketError::Malformed("SUBSCRIBE without a topic filter"));
    }
    Ok(filters)
}

/// Why a CONNECT is refused, in the words both protocol versions have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    NotAuthorized,
    /// 3.1.1: an empty client id with a session to keep.
    IdentifierRejected,
}

/// The CONNACK that refuses a connection, in the device's protocol version.
pub fn connack_refusal(level: u8, refusal: Refusal) -> Vec<u8> {
    let (v4, v5) = match refusal {
        Refusal::BadCredentials => (4, 0x86),
        Refusal::NotAuthorized => (5, 0x87),
        Refusal::IdentifierRejected => (2, 0x85),
    };
    if level == 5 {
        // Session present 0, reason code, no properties.
        vec![0x20, 3, 0, v5, 0]
    } else {
        vec![0x20, 2, 0, v4]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_packet(level: u8, will: Option<&str>, login: Option<(&str, &[u8])>) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level];
        let mut flags = 0x02;
        if will.is_some() {
            flags |= WILL_FLAG;
        }
        if login.is_some() {
            flags |= USERNAME_FLAG | PASSWORD_FLAG;
        }
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            // Session expiry interval property.
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
        }
        put_binary(&mut body, b"dev-1");
        if let Some(topic) = will {
            if level == 5 {
                body.push(0);
            }
            put_binary(&mut body, topic.as_bytes());
            put_binary(&mut body, b"bye");
        }
        if let Some((user, pass)) = login {
            put_binary(&mut body, user.as_bytes());
            put_binary(&mut body, pass);
        }
        framed(CONNECT << 4, &body)
    }

    fn parse(packet: &[u8]) -> Connect<'_> {
        let f = frame(packet, 1 << 20).expect("test").expect("test");
        assert_eq!(f.len, packet.len());
        Connect::parse(packet, f).expect("test")
    }

    #[test]
    fn the_probe_connect_parses() {
        let p = connect_v4("probe", "guard", b"secret", 10);
        let c = parse(&p);
        assert_eq!(
            (c.level, c.client_id, c.username),
            (4, "probe", Some("guard"))
        );
        assert_eq!(c.password, Some(&b"secret"[..]));
    }

    #[test]
    fn connect_fields_in_both_versions() {
        for level in [4, 5] {
            let p = connect_packet(
                level,
                Some("telemetry/dev-1/status"),
                Some(("dev-1", b"pw")),
            );
            let c = parse(&p);
            assert_eq!(c.level, level);
            assert_eq!(c.client_id, "dev-1");
            assert_eq!(c.username, Some("dev-1"));
            assert_eq!(c.password, Some(&b"pw"[..]));
            assert_eq!(c.will_topic, Some("telemetry/dev-1/status"));
        }
    }

    /// Found by the `mqtt_rumqttd` fuzz target: the guard read no user name where rumqttd
    /// reads an empty one.
    #[test]
    fn a_password_without_a_user_name_is_malformed_in_3_1_1_and_allowed_in_5() {
        for level in [4u8, 5] {
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, PASSWORD_FLAG, 0, 60];
            if level == 5 {
                body.push(0);
            }
            body.extend_from_slice(&[0, 5]);
            body.extend_from_slice(b"dev-1");
            body.extend_from_slice(&[0, 3]);
            body.extend_from_slice(b"pas");
            let p = framed(CONNECT << 4, &body);
            let f = frame(&p, 1 << 20).expect("test").expect("test");
            let parsed = Connect::parse(&p, f);
            if level == 4 {
                assert!(
                    matches!(parsed, Err(PacketError::Malformed(m)) if m.contains("password")),
                    "{:?}",
                    parsed.map(|c| c.client_id)
                );
            } else {
                let c = parsed.expect("MQTT 5 allows a password alone");
                assert_eq!((c.username, c.password), (None, Some(&b"pas"[..])));
            }
        }
    }

    #[test]
    fn rebuilt_connect_keeps_everything_but_the_login() {
        for level in [4, 5] {
            let p = connect_packet(level, Some("telemetry/dev-1/status"), None);
            let rebuilt = parse(&p).rebuild("dev-1:dev-1", "guard", b"secret", 60);
            let c = parse(&rebuilt);
            assert_eq!(c.level, level);
            assert_eq!(c.client_id, "dev-1:dev-1");
            assert_eq!(c.username, Some("guard"));
            assert_eq!(c.password, Some(&b"secret"[..]));
            assert_eq!(c.will_topic, Some("telemetry/dev-1/status"));
            assert_eq!(c.keep_alive, 60, "the guard's own keep-alive");
            assert_eq!(c.properties, parse(&p).properties);
            assert_eq!(c.session_expiry, if level == 5 { 60 } else { 0 });
            assert_eq!(
                c.keeps_session(),
                level == 5,
                "v4 here asks for a clean session"
            );
        }
    }

    #[test]
    fn every_truncation_of_a_connect_is_an_error_not_a_panic() {
        let p = connect_packet(5, Some("t/x/y"), Some(("u", b"p")));
        let f = frame(&p, 1 << 20).expect("test").expect("test");
        for cut in f.header..p.len() {
            let mut short = p[..cut].to_vec();
            // Pretend the packet ends here: the body is shorter than its fields say.
            short[1] = (cut - 2) as u8;
            let g = frame(&short, 1 << 20).expect("test").expect("test");
            assert!(Connect::parse(&short, g).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn framing_waits_for_whole_packets_and_bounds_them() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        let mut p = vec![0x32, 0x80, 0x01];
        assert_eq!(frame(&p, 1000), Ok(None), "header only");
        p.resize(130, 0);
        assert_eq!(frame(&p, 1000), Ok(None), "one byte short");
        p.push(0);
        p.push(0x30);
        let f = frame(&p, 1000).expect("test").expect("test");
        assert_eq!((f.kind, f.flags, f.header, f.len), (3, 2, 3, 131));
        assert_eq!(
            frame(&[0x30, 0x80, 0x01], 100),
            Err(PacketError::TooLarge {
                size: 131,
                limit: 100
            })
        );
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff], usize::MAX).is_err());
    }

    #[test]
    fn publish_fields_alias_and_content_type() {
        // QoS 1, retained, topic "a/b", packet id 7, properties: content type "x", alias 3,
        // payload format indicator 1.
        let mut body = Vec::new();
        put_binary(&mut body, b"a/b");
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(&[9, 0x03, 0, 1, b'x', 0x23, 0, 3, 0x01, 1]);
        body.extend_from_slice(b"payload");
        let p = framed(0x33, &body);
        let f = frame(&p, 1000).expect("test").expect("test");
        let got = publish(&p, f, true).expect("parses");
        assert_eq!(
            got,
            Publish {
                name: "a/b",
                alias: Some(3),
                qos: 1,
                retain: true,
                dup: false,
                packet_id: Some(7),
                content_type: Some("x"),
                utf8: true,
                payload: b"payload",
            }
        );
        // Forwarded with the topic spelled out and no alias; every other property kept.
        let named = with_topic(&p, f, "x/y/z").expect("rebuilds");
        let nf = frame(&named, 1000).expect("test").expect("test");
        let n = publish(&named, nf, true).expect("parses");
        assert_eq!(
            (
                n.name,
                n.alias,
                n.packet_id,
                n.content_type,
                n.utf8,
                n.payload
            ),
            ("x/y/z", None, Some(7), Some("x"), true, &b"payload"[..])
        );
        assert_eq!(publish_id(&named, nf), Some((1, Some(7))));
        // The same bytes read as 3.1.1: no properties, the rest is payload.
        let v4 = publish(&p, f, false).expect("parses");
        assert_eq!((v4.alias, v4.content_type), (None, None));
        assert_eq!(v4.payload.len(), 10 + 7);
        // Handed to the broker at QoS 0: no packet id, still retained, same payload.
        let copy = at_qos0(&p, f);
        let cf = frame(&copy, 1000).expect("test").expect("test");
        let c = publish(&copy, cf, true).expect("parses");
        assert_eq!(
            (c.qos, c.retain, c.packet_id, c.payload),
            (0, true, None, &b"payload"[..])
        );
        assert_eq!(c.content_type, Some("x"));
    }

    #[test]
    fn replies_in_both_versions() {
        assert_eq!(Reply::new(PUBACK, 7, 0, false).as_bytes(), [0x40, 2, 0, 7]);
        assert_eq!(Reply::new(PUBACK, 7, 0, true).as_bytes(), [0x40, 2, 0, 7]);
        assert_eq!(
            Reply::new(PUBACK, 7, 0x99, false).as_bytes(),
            [0x40, 2, 0, 7]
        );
        assert_eq!(
            Reply::new(PUBACK, 7, 0x99, true).as_bytes(),
            [0x40, 3, 0, 7, 0x99]
        );
        assert_eq!(Reply::new(PUBREC, 258, 0, true).as_bytes(), [0x50, 2, 1, 2]);
        assert_eq!(Reply::new(PUBCOMP, 1, 0, false).as_bytes(), [0x70, 2, 0, 1]);
    }

    #[test]
    fn subscribe_filters_are_listed() {
        let mut body = 9u16.to_be_bytes().to_vec();
        body.push(0);
        put_binary(&mut body, b"a/+");
        body.push(1);
        put_binary(&mut body, b"#");
        body.push(0);
        let p = framed(0x82, &body);
        let f = frame(&p, 1000).expect("test").expect("test");
        assert_eq!(subscribe_filters(&p, f, true), Ok(vec!["a/+", "#"]));
    }

    /// Found by the fuzz target `mqtt_rumqttd`: rumqttd 0.20 counts a subscription
    /// identifier a byte too long, so with two of them it read the last two property bytes
    /// of this PUBLISH as payload. A client may not send one in a PUBLISH at all.
    #[test]
    fn a_publish_from_a_device_with_a_subscription_identifier_is_malformed() {
        let p = [
            0x39, 0x10, 0, 0, 0x0a, 0x0b, 0, 0x23, 0, 4, 0x0b, 0xff, 0, 1, 0xb3, 0xd4, 0xff, 0xab,
        ];
        let f = frame(&p, 1000).expect("test").expect("test");
        assert_eq!(
            publish(&p, f, true),
            Err(PacketError::Malformed(
                "PUBLISH from a client with a subscription identifier"
            ))
        );
        // Without it, the same packet parses.
        let q = [0x39, 0x08, 0, 0, 0x02, 0x01, 0xb3, 0xd4, 0xff, 0xab];
        let f = frame(&q, 1000).expect("test").expect("test");
        assert_eq!(publish(&q, f, true).map(|p| p.payload), Ok(&q[7..]));
    }

    /// The same miscount in a SUBSCRIBE: three identifiers and rumqttd took the third for the
    /// start of a topic filter the guard never checked.
    #[test]
    fn a_subscribe_with_a_second_subscription_identifier_or_one_of_0_is_malformed() {
        let with = |props: &[u8]| {
            let mut body = 9u16.to_be_bytes().to_vec();
            put_varint(&mut body, props.len());
            body.extend_from_slice(props);
            put_binary(&mut body, b"commands/d/#");
            body.push(1);
            framed(0x82, &body)
        };
        let refused = Err(PacketError::Malformed(
            "SUBSCRIBE with a second subscription identifier or one of 0",
        ));
        for props in [&[0x0b, 1, 0x0b, 1, 0x0b, 1][..], &[0x0b, 0]] {
            let p = with(props);
            let f = frame(&p, 1000).expect("test").expect("test");
            assert_eq!(subscribe_filters(&p, f, true), refused, "{props:?}");
        }
        let p = with(&[0x0b, 0x81, 1, 0x26, 0, 1, b'k', 0, 1, b'v']);
        let f = frame(&p, 1000).expect("test").expect("test");
        assert_eq!(subscribe_filters(&p, f, true), Ok(vec!["commands/d/#"]));
    }

    #[test]
    fn a_device_may_send_only_client_packets_with_their_flags() {
        let of = |first: u8| Frame {
            kind: first >> 4,
            flags: first & 0x0f,
            header: 2,
            len: 2,
        };
        for first in [
            0x10, 0x30, 0x3b, 0x40, 0x50, 0x62, 0x70, 0x82, 0xa2, 0xc0, 0xe0,
        ] {
            assert_eq!(sent_by_device(of(first)), Ok(()), "{first:#04x}");
        }
        // Reserved 0, CONNACK, SUBACK, UNSUBACK, PINGRESP, AUTH; then wrong flags.
        for first in [
            0x00, 0x20, 0x90, 0xb0, 0xd0, 0xf0, 0x11, 0x60, 0x80, 0xa0, 0xc1, 0xe2,
        ] {
            assert!(sent_by_device(of(first)).is_err(), "{first:#04x}");
        }
    }

    #[test]
    fn refusals_in_both_versions() {
        assert_eq!(connack_refusal(4, Refusal::BadCredentials), [0x20, 2, 0, 4]);
        assert_eq!(
            connack_refusal(5, Refusal::NotAuthorized),
            [0x20, 3, 0, 0x87, 0]
        );
    }
}
