//! The exit port: firmware writes its exit status here and the partition stops.

use crate::bus::{BusDevice, IoAction};

/// Decodes a status write of 1, 2 or 4 bytes (little-endian).
#[derive(Debug, Default)]
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> IoAction {
        let mut raw = [0u8; 4];
        let n = data.len().min(raw.len());
        raw[..n].copy_from_slice(&data[..n]);
        IoAction::Stop(u32::from_le_bytes(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_write_width_stops_with_its_value() {
        let mut port = ExitPort;
        assert_eq!(port.write(0, &[3]), IoAction::Stop(3));
        assert_eq!(port.write(0, &[0x34, 0x12]), IoAction::Stop(0x1234));
        assert_eq!(port.write(0, &101u32.to_le_bytes()), IoAction::Stop(101));
    }
}
