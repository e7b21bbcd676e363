/* report.html's script: sort by a column, filter by tier and text, and a lightbox for every row (its caption,
   the outline on or off, the arrow keys through the worklist in the order shown, Esc to close, #view=ID to open
   one image). It reads no data from outside the page. */
(function(){
  'use strict';
  var table=document.getElementById('worklist'), body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows), dir={};
  function num(v){var x=parseFloat(v);return isNaN(x)?null:x;}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    if(th.hasAttribute('data-nosort')){return;}
    th.addEventListener('click',function(){
      dir[col]=!dir[col];
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',dir[col]?'ascending':'descending');
      rows.sort(function(a,b){
        var x=a.cells[col].getAttribute('data-v'), y=b.cells[col].getAttribute('data-v');
        var nx=num(x), ny=num(y), c;
        if(nx!==null&&ny!==null){c=nx-ny;}else{c=String(x).localeCompare(String(y));}
        return dir[col]?c:-c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  // The legend stands open where there is room for it and the worklist; on a phone it is one line to open.
  if(window.matchMedia&&window.matchMedia('(min-width: 761px)').matches){
    document.getElementById('legend').setAttribute('open','');
  }
  var tier=document.getElementById('tier'), search=document.getElementById('search');
  function filter(){
    var t=tier.value, q=search.value.toLowerCase(), count=0;
    rows.forEach(function(r){
      var ok=(!t||r.getAttribute('data-tier')===t)&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=ok?'':'none'; if(ok){count++;}
    });
    document.getElementById('shown').textContent=count;
  }
  tier.addEventListener('change',filter); search.addEventListener('input',filter); filter();

  var box=document.getElementById('lightbox'), big=document.getElementById('big');
  var caption=document.getElementById('caption'), outline=document.getElementById('outline');
  var position=document.getElementById('position'), current=null;
  function visible(){return rows.filter(function(r){return r.style.display!=='none';});}
  function picture(row){
    var full=row.getAttribute('data-full'), plain=row.getAttribute('data-plain');
    var thumb=row.querySelector('button.open img');
    outline.disabled=!(full&&plain);
    if(full&&(outline.checked||!plain)){return [full,'overlay of '];}
    if(plain){return [plain,''];}
    return thumb?[thumb.getAttribute('src'),'']:[null,''];
  }
  function show(row){
    current=row;
    var id=row.getAttribute('data-id'), chosen=picture(row);
    if(chosen[0]){big.src=chosen[0];big.alt=chosen[1]+id;big.style.display='';}
    else{big.removeAttribute('src');big.alt='';big.style.display='none';}
    caption.textContent=row.getAttribute('data-caption')+(chosen[0]?'':' · no picture kept for this row');
    var shown=visible(), at=shown.indexOf(row);
    position.textContent=(at+1)+' of '+shown.length;
    box.setAttribute('data-view',id);
    box.style.display='flex';
    if(history.replaceState){history.replaceState(null,'','#view='+encodeURIComponent(id));}
  }
  function close(){
    box.style.display='none'; box.removeAttribute('data-view'); big.removeAttribute('src'); current=null;
    if(history.replaceState){history.replaceState(null,'',location.pathname+location.search);}
  }
  function move(step){
    if(!current){return;}
    var shown=visible(), at=shown.indexOf(current);
    if(at<0){return;}
    var next=shown[at+step];
    if(next){show(next);}
  }
  rows.forEach(function(row){
    var opener=row.querySelector('button.open');
    if(opener){opener.addEventListener('click',function(){show(row);});}
  });
  outline.addEventListener('change',function(){if(current){show(current);}});
  document.getElementById('prev').addEventListener('click',function(){move(-1);});
  document.getElementById('next').addEventListener('click',function(){move(1);});
  document.getElementById('close').addEventListener('click',close);
  box.addEventListener('click',function(e){if(e.target===box){close();}});
  document.addEventListener('keydown',function(e){
    if(!current){return;}
    if(e.key==='Escape'){close();e.preventDefault();}
    else if(e.key==='ArrowRight'||e.key==='ArrowDown'){move(1);e.preventDefault();}
    else if(e.key==='ArrowLeft'||e.key==='ArrowUp'){move(-1);e.preventDefault();}
  });
  function fromHash(){  // a link straight to one row's picture: report.html#view=IMAGE_ID
    var m=/^#view=(.+)$/.exec(location.hash);
    if(!m){return;}
    var id=decodeURIComponent(m[1]);
    var hit=rows.filter(function(r){return r.getAttribute('data-id')===id;})[0];
    document.getElementById('missing').textContent='';
    if(hit){show(hit);}
    else{document.getElementById('missing').textContent='No row has the image id '+id+' (from the link\'s #view=).';}
  }
  fromHash();
  window.addEventListener('hashchange',fromHash);  // a link followed from this page, or one pasted
  document.body.setAttribute('data-ready','1');
})();
