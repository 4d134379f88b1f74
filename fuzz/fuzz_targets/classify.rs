#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpay_fuzz_targets::classify::run(data));
