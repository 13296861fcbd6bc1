//! Client frames as borrowed views of the read buffer, and encoders for every frame.
//!
//! Decoding never copies payload bytes: a [`ClientFrame`] borrows from the connection's input
//! buffer. Encoders append to a caller-owned `Vec<u8>` so a shard can batch many frames into one
//! write. Client-side encoders ([`ClientFrame::encode`]) serve the load generator and the tests.



/// Client → server opcodes.
pub mod op {
    pub const LOGIN: u8 = 0x01;
    pub const SEND: u8 = 0x02;
    pub const ACK: u8 = 0x03;
    pub const BATCH_SEND: u8 = 0x04;
    pub const GET_STATUS: u8 = 0x05;
    pub const SEND_SEQ: u8 = 0x07;
    pub const CBOR_MSG: u8 = 0x10;
    pub const UPLOAD_PREKEYS: u8 = 0x20;
    pub const FETCH_PREKEYS: u8 = 0x21;
    pub const E2EE_MSG: u8 = 0x23;
    pub const GROUP_CREATE: u8 = 0x30;
    pub const GROUP_ADD: u8 = 0x31;
    pub const GROUP_LEAVE: u8 = 0x32;
    pub const GROUP_MSG: u8 = 0x33;
    pub const GROUP_ROSTER: u8 = 0x35;
    pub const SENDER_KEY_DIST: u8 = 0x36;
    pub const TYPING_START: u8 = 0x70;
    pub const TYPING_STOP: u8 = 0x71;
    pub const READ_RECEIPT: u8 = 0x74;
}

/// Server → client opcodes.
pub mod sop {
    pub const LOGIN_OK: u8 = 0x03;
    pub const STATUS: u8 = 0x06;
    pub const RELIABLE_MSG: u8 = 0x10;
    pub const PREKEY_RESPONSE: u8 = 0x22;
    pub const E2EE_DELIVERY: u8 = 0x24;
    pub const TYPING_RELAY: u8 = 0x72;
    pub const READ_RECEIPT_RELAY: u8 = 0x75;
    pub const ERROR: u8 = 0xFE;
    pub const RATE_LIMITED: u8 = 0xFF;
}
