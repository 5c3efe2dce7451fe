//! The baseline for the channel benchmarks: the same ping/echo exchange as the `ping` and
//! `echo` fixtures, over plain TCP on loopback between two processes.
//!
//! ```text
//! tcp-pingpong echo PORT                      # serves until the client hangs up
//! tcp-pingpong ping PORT COUNT SIZE BATCH     # prints rate and round-trip percentiles
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<usize>().ok());
    let result = match (args.get(1).map(String::as_str), num(2)) {
        (Some("echo"), Some(port)) => echo(port as u16),
        (Some("ping"), Some(port)) => match (num(3), num(4), num(5)) {
            (Some(count), Some(size), Some(batch)) if size > 0 && batch > 0 => {
                ping(port as u16, count, size, batch)
            }
            _ => Err("usage: tcp-pingpong ping PORT COUNT SIZE BATCH".into()),
        },
        _ => Err("usage: tcp-pingpong echo PORT | ping PORT COUNT SIZE BATCH".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-pingpong: {e}");
            ExitCode::from(1)
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn echo(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
}

fn ping(port: u16, count: usize, size: usize, batch: usize) -> Result<()> {
    let mut stream = connect(port)?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let out: Vec<u8> = (0..size * batch).map(|i| i as u8).collect();
    let mut back = vec![0u8; size * batch];
    let mut rtts = Vec::with_capacity(count);
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let t0 = Instant::now();
        stream.write_all(&out[..n * size]).map_err(|e| e.to_string())?;
        stream.read_exact(&mut back[..n * size]).map_err(|e| e.to_string())?;
        if back[..n * size] != out[..n * size] {
            return Err("an echo did not match".into());
        }
        rtts.extend(std::iter::repeat_n(t0.elapsed(), n));
        sent += n;
    }
    let elapsed = start.elapsed().as_secs_f64();
    rtts.sort();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)].as_micros();
    let rate = count as f64 / elapsed;
    println!(
        "tcp: {count} messages of {size} bytes, batch {batch}: {} msg/s, {} MB/s, round trip p50 {} us, p99 {} us",
        rate as u64,
        (rate * size as f64 / 1e6) as u64,
        pct(50),
        pct(99)
    );
    Ok(())
}

/// Connects, retrying briefly while the echo process starts listening.
fn connect(port: u16) -> Result<TcpStream> {
    for _ in 0..200 {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            return Ok(stream);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("nothing listens on 127.0.0.1:{port}"))
}
